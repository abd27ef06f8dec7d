"""`shmhub top` on a live hub of 3 streaming guests, one of them killed: as data (`--json`) and as
a person sees it, on a terminal under tmux (`capture-pane`)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

from linkutil import guest_argv

TIMEOUT = 30.0


@pytest.fixture
def hub():
    """tests/guests/top_hub.py with 3 guests: (host pid, {peer_id: guest pid})."""
    p = subprocess.Popen(guest_argv("top_hub.py", 3), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([p.stdout], [], [], TIMEOUT)
        assert ready, "the hub did not start"
        line = p.stdout.readline()
        assert line, p.stderr.read()
        info = json.loads(line)
        yield info["host"], {int(k): v for k, v in info["guests"].items()}
    finally:
        p.stdin.close()
        try:
            p.wait(TIMEOUT)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            p.stdout.close()
            p.stderr.close()
    assert p.returncode == 0


def until(what, check, timeout=TIMEOUT, interval=0.1):
    """Poll `check()` until it returns something true (no event exists for another process's screen)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s; last: {got!r}")
        time.sleep(interval)


def top_json(host_pid):
    out = subprocess.run(
        [sys.executable, "-m", "shmhub", "top", "--pid", str(host_pid), "--json", "--interval", "0.3"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    return {g["peer"]: g for g in json.loads(out.stdout)["guests"]}


def test_top_json_sees_three_streaming_guests_and_a_death(hub):
    host_pid, guests = hub
    rows = until("3 streaming guests", lambda: (r := top_json(host_pid)) and all(r[i]["g2h_Bps"] > 0 and r[i]["g2h_mps"] > 0 for i in (1, 2, 3)) and r)
    assert {i: (r["pid"], r["state"]) for i, r in rows.items()} == {i: (guests[i], "Attached") for i in (1, 2, 3)}
    assert all(r["h2g_Bps"] > 0 or r["g2h_Bps"] > 0 for r in rows.values())
    os.kill(guests[2], signal.SIGKILL)
    rows = until("guest 2 recovered", lambda: (r := top_json(host_pid)) and r[2]["state"] == "Empty" and r)
    assert rows[2]["slots"] == 0 and rows[2]["g2h_Bps"] == 0 and rows[2]["g2h_mps"] == 0
    assert rows[1]["state"] == rows[3]["state"] == "Attached"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_top_on_a_terminal(hub, tmp_path):
    host_pid, guests = hub
    sock = f"shmhub-test-{os.getpid()}"
    tmux = ["tmux", "-L", sock, "-f", "/dev/null"]
    # tmux's global environment may carry COLUMNS=80 from its start-up, which rich would believe.
    cmd = f"env -u COLUMNS -u LINES {sys.executable} -m shmhub top --pid {host_pid} --interval 0.2; echo $? > {tmp_path}/rc; sleep 30"
    subprocess.run(tmux + ["new-session", "-d", "-x", "160", "-y", "30", cmd], check=True, timeout=TIMEOUT)
    try:

        def screen():
            return subprocess.run(tmux + ["capture-pane", "-p"], capture_output=True, text=True, timeout=TIMEOUT).stdout

        def row(text, peer):
            """(pid, state, h2g rate, g2h rate, left, recovered, g2h msg/s) of a peer's row on the screen."""
            rate, count = r"([\d.]+ \w?B/s)", r"([\d.]+\w?)"
            m = re.search(rf"^│\s+{peer} │\s+(\d+) │ (\w+)\s+│\s+\d+ │\s+{count} │\s+{rate} │\s+{count} │\s+{rate} │.*│\s+(\d+) │\s+(\d+) │$", text, re.M)
            return m and (int(m.group(1)), m.group(2), m.group(4), m.group(6), int(m.group(7)), int(m.group(8)), m.group(5))

        last = [""]

        def streaming():
            text = last[0] = screen()
            rows = [row(text, i) for i in (1, 2, 3)]
            return all(r and r[3] != "0 B/s" and r[6] != "0" for r in rows) and text

        try:
            text = until("3 guests streaming on screen", streaming)
        except AssertionError as e:
            raise AssertionError(f"{e}\nthe screen:\n{last[0]}") from None
        assert f"shmhub top  /proc/{host_pid}/fd/" in text, text
        assert [row(text, i)[:2] + row(text, i)[4:6] for i in (1, 2, 3)] == [(guests[i], "Attached", 0, 0) for i in (1, 2, 3)]
        os.kill(guests[2], signal.SIGKILL)
        text = until("the killed guest recovered on screen", lambda: (t := screen()) and (row(t, 2) or (0, ""))[1] == "Empty" and t)
        assert row(text, 2) == (guests[2], "Empty", "0 B/s", "0 B/s", 1, 1, "0")  # left once, recovered once
        assert row(text, 1)[1] == row(text, 3)[1] == "Attached" and row(text, 1)[4:6] == row(text, 3)[4:6] == (0, 0)
        subprocess.run(tmux + ["send-keys", "s"], check=True, timeout=TIMEOUT)  # sort by pid
        until("sorted by pid", lambda: "pid ^" in screen())
        subprocess.run(tmux + ["send-keys", "q"], check=True, timeout=TIMEOUT)
        rc = until("top quit on q", lambda: (tmp_path / "rc").exists() and (tmp_path / "rc").read_text().strip())
        assert rc == "0"
    finally:
        subprocess.run(tmux + ["kill-server"], capture_output=True, timeout=TIMEOUT)
