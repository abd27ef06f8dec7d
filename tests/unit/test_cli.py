"""`shmhub` commands other than inspect's decoding (tests/unit/test_inspect.py): exit status,
clean, inspect --watch, and the pure data of top (shmhub.monitor, shmhub.top.Tracker)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub import monitor, top
from shmhub.cli import main

CFG = SegmentConfig(max_guests=2, bipbuf_capacity=256, size_classes=((64, 4), (256, 2)))


def run(*argv, stdin=""):
    out, err = io.StringIO(), io.StringIO()
    old = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(argv))
    finally:
        sys.stdin = old
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["inspect"],
        ["top"],
        ["top", "x", "--pid", "1"],
        ["inspect", "x", "--watch", "--interval", "0"],
        ["top", "--pid", "x"],
        ["top", "x", "--sort", "nope"],
    ],
)
def test_usage_errors_exit_2(argv):
    assert run(*argv)[0] == 2


def test_help_exits_0():
    rc, out, _ = run("--help")
    assert rc == 0 and "top" in out and "clean" in out


def test_failures_exit_1_with_one_line(tmp_path):
    for argv in (
        ["top", "--pid", str(2**22 + 1)],
        ["top", str(tmp_path / "missing")],
        ["inspect", str(tmp_path / "missing")],
        ["top", "--pid", str(os.getpid()), "--json"],
    ):
        rc, out, err = run(*argv)
        assert (rc, out) == (1, ""), argv
        assert len(err.splitlines()) == 1 and err.startswith(f"shmhub {argv[0]}: "), err


def test_top_pid_finds_the_segment_a_process_holds():
    with Segment.create(CFG) as seg:
        path = top.resolve(None, os.getpid())
        assert path == f"/proc/{os.getpid()}/fd/{seg.fd}"
        with Segment.create(CFG):
            with pytest.raises(LookupError, match="holds 2 segments"):
                top.resolve(None, os.getpid())


# -- clean --------------------------------------------------------------------------------------


def _abandoned(path):
    """A named segment whose creator closed it without unlinking: what a crashed host leaves."""
    Segment.create(CFG, path).close()


def test_clean_finds_only_segments_whose_host_is_gone(shm_path, tmp_path):
    _abandoned(shm_path)
    other = tmp_path / "not-a-segment"
    other.write_bytes(b"\0" * 4096)
    with Segment.create(CFG, shm_path + "-live") as live:
        try:
            assert [s.path for s in monitor.stale_segments([shm_path, shm_path + "-live", str(other)])] == [shm_path]
            rc, out, _ = run("clean", "--json", shm_path, shm_path + "-live", str(other))
            assert rc == 0 and [s["path"] for s in json.loads(out)] == [shm_path]
            assert os.path.exists(shm_path)  # --json without --yes only lists
        finally:
            live.unlink()
    os.unlink(shm_path)


def test_clean_asks_and_keeps_the_file_unless_told_yes(shm_path):
    _abandoned(shm_path)
    rc, out, err = run("clean", shm_path, stdin="n\n")
    assert rc == 1 and f"stale: {shm_path}" in out and "nothing removed" in err and os.path.exists(shm_path)
    rc, _, _ = run("clean", shm_path, stdin="")  # no answer (EOF) is no
    assert rc == 1 and os.path.exists(shm_path)
    rc, out, _ = run("clean", shm_path, stdin="y\n")
    assert rc == 0 and "removed 1" in out and not os.path.exists(shm_path)


def test_clean_yes_removes_and_reports_json(shm_path):
    _abandoned(shm_path)
    rc, out, _ = run("clean", "--yes", "--json", shm_path)
    assert rc == 0 and json.loads(out) == {"removed": [shm_path]} and not os.path.exists(shm_path)
    assert run("clean", "--yes", shm_path)[:2] == (0, "no stale segments\n")


def test_clean_searches_a_directory(tmp_path):
    _abandoned(str(tmp_path / "a.seg"))
    with Segment.create(CFG, str(tmp_path / "b.seg")):
        rc, out, _ = run("clean", "--yes", str(tmp_path))
        assert rc == 0 and sorted(os.listdir(tmp_path)) == ["b.seg"]


# -- inspect --watch ----------------------------------------------------------------------------


def test_inspect_watch_refreshes_in_place_until_interrupted(shm_path):
    with Segment.create(CFG, shm_path) as seg:
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", "shmhub", "inspect", shm_path, "--watch", "--interval", "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                seen = b""
                while seen.count(b"\x1b[2J") < 4:  # the screen is cleared before each frame
                    chunk = p.stdout.read1(65536)
                    assert chunk, p.stderr.read()
                    seen += chunk
                p.send_signal(signal.SIGINT)
                rest, err = p.communicate(timeout=10)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            assert p.returncode == 0, err
            frames = [f for f in (seen + rest).split(b"\x1b[H\x1b[2J") if f]
            assert len(frames) >= 3 and all(f.startswith(b"segment 'ROAMHUB") and f.endswith(b"extents 1/1\n") for f in frames[:3])
        finally:
            seg.unlink()


def test_inspect_watch_json_prints_one_object_per_line(shm_path):
    with Segment.create(CFG, shm_path) as seg:
        try:
            p = subprocess.Popen([sys.executable, "-m", "shmhub", "inspect", shm_path, "--watch", "--json", "--interval", "0.05"], stdout=subprocess.PIPE)
            try:
                lines = [p.stdout.readline() for _ in range(3)]
                p.send_signal(signal.SIGINT)
                p.communicate(timeout=10)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            assert p.returncode == 0
            assert [json.loads(line)["header"]["max_guests"] for line in lines] == [2, 2, 2]
        finally:
            seg.unlink()


# -- top's data ---------------------------------------------------------------------------------


def ring(read, write=0, watermark=0, capacity=256):
    return {"read": read, "write": write, "watermark": watermark, "capacity": capacity}


def test_ring_advance_counts_released_bytes_across_one_wrap():
    assert monitor.ring_advance(ring(10, 50), ring(40, 50)) == 30
    assert monitor.ring_advance(ring(200, 30, 240), ring(20, 30)) == 40 + 20  # read reached the watermark, wrapped
    assert monitor.ring_advance(ring(200, 230), ring(16, 64)) == 30 + 16  # the writer wrapped after the first look


def peer(state="Attached", epoch=1, read=0, slots=(0, 0)):
    r = dict(ring(read), used=0, producer_waiting=0, consumer_waiting=0)
    return {"state": state, "epoch": epoch, "last_heartbeat": 0, "g2h": r, "h2g": dict(r, consumer_waiting=1), "slots_held": list(slots)}


def snap(t, **peers):
    return {
        "time_ns": t,
        "host_goodbye": False,
        "current_size": 0,
        "classes": [],
        "host_slots_held": [0, 0],
        "peers": {int(k[1:]): v for k, v in peers.items()},
    }


def test_tracker_rates_departures_and_recoveries():
    tr = top.Tracker()
    rows = tr.update(snap(0, p1=peer(), p2=peer(), p3=peer("Empty", 0)), {1: 101, 2: 102})
    assert [r["peer"] for r in rows] == [1, 2]  # a peer never used is not shown
    rows = tr.update(snap(500_000_000, p1=peer(read=100, slots=(2, 1)), p2=peer("Goodbye"), p3=peer("Empty", 0)))
    one, two = rows
    assert (one["g2h_Bps"], one["h2g_Bps"], one["slots"], one["slots_per_class"], one["waits"]) == (200.0, 200.0, 3, [2, 1], "G:r")
    assert (two["pid"], two["left"], two["recovered"], two["g2h_Bps"]) == (102, 1, 0, 0.0)
    rows = tr.update(snap(10**9, p1=peer(read=100), p2=peer("Empty"), p3=peer("Empty", 0)))
    assert (rows[1]["left"], rows[1]["recovered"]) == (1, 1)
    # a peer reused between two looks (Empty, Reserved, Attached again: epoch + 1 and + 1) counts both
    rows = tr.update(snap(2 * 10**9, p1=peer(epoch=3, read=100), p2=peer("Empty"), p3=peer("Empty", 0)))
    assert (rows[0]["left"], rows[0]["recovered"], rows[0]["g2h_Bps"]) == (1, 1, 0.0)
    assert [r["peer"] for r in top.sort_rows(rows, "g2h_fill")] == [1, 2]
    with pytest.raises(ValueError, match="unknown sort key"):
        top.sort_rows(rows, "nope")


def test_tracker_message_rates_come_from_the_ring_counters():
    def counted(messages, nbytes, read=0, bells=0):
        p = peer(read=read)
        for d in ("g2h", "h2g"):
            p[d] = dict(p[d], sent_messages=messages, sent_bytes=nbytes, doorbells=bells)
        return p

    tr = top.Tracker()
    rows = tr.update(snap(0, p1=counted(10, 1000), p2=peer()))
    assert (rows[0]["g2h_mps"], rows[1]["g2h_mps"]) == (0.0, None)  # None: a v7 segment has no counters
    rows = tr.update(snap(500_000_000, p1=counted(510, 801_000, read=64, bells=7), p2=peer(read=100)))
    one, two = rows
    # payload bytes from the counters (not the read index's 64 B of frames); messages and doorbells likewise
    assert (one["g2h_mps"], one["g2h_Bps"], one["h2g_mps"], one["g2h_bells"]) == (1000.0, 1_600_000.0, 1000.0, 14.0)
    assert (two["g2h_mps"], two["g2h_Bps"], two["h2g_bells"]) == (None, 200.0, None)
    rows = tr.update(snap(10**9, p1=counted(3, 50), p2=peer(read=100)))  # counters fell: a reset ring
    assert (rows[0]["g2h_mps"], rows[0]["g2h_Bps"]) == (0.0, 0.0)
    assert [top.human_count(x) for x in (None, 0.0, 999.0, 12_345.0, 2.5e6)] == ["-", "0", "999", "12.3k", "2.5M"]


def test_sort_rows_puts_unknown_pids_last():
    rows = [{"pid": None, "peer": 1}, {"pid": 7, "peer": 2}, {"pid": 3, "peer": 3}]
    assert [r["peer"] for r in top.sort_rows(rows, "pid")] == [3, 2, 1]


def test_human_rate():
    assert [top.human_rate(x) for x in (0, 999, 1500, 121_000, 2.5e6, 7e12)] == ["0 B/s", "999 B/s", "1.5 kB/s", "121 kB/s", "2.5 MB/s", "7000 GB/s"]


def test_sample_reads_slots_held_per_owner_and_peer_state():
    with Segment.create(CFG) as seg:
        seg.peers.attach()
        seg.alloc(10, 1)
        seg.alloc(100, 1)
        seg.alloc(10, 0)
        s = monitor.sample(seg)
        assert s["peers"][1]["slots_held"] == [1, 1] and s["host_slots_held"] == [1, 0]
        assert s["peers"][1]["state"] == "Attached" and s["peers"][2]["state"] == "Empty"
        assert [(k["allocated"], k["free"]) for k in s["classes"]] == [(2, 2), (1, 1)]
        assert "mmap" in s["peers"][1] and seg.features & L.FEATURE_MMAP_LEASES


def test_bench_quick_prints_the_table(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "shmhub", "bench", "--quick", "--only", "pingpong", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "### Ping-pong, 64 B, blocking receive" in out.stdout
    shm = re.search(r"^\| shmhub \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", out.stdout, re.M)
    assert shm and float(shm.group(1)) > 0 and int(shm.group(3)) > 0, out.stdout
    assert (tmp_path / "latest.md").read_text() in out.stdout and json.loads((tmp_path / "latest.json").read_text())["pingpong_blocking"]


def test_top_without_rich_names_the_extra(monkeypatch):
    for mod in [m for m in sys.modules if m == "rich" or m.startswith("rich.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ImportError
    with Segment.create(CFG) as seg:
        rc, out, err = run("top", f"/proc/self/fd/{seg.fd}")
    assert (rc, out) == (1, "") and "pip install 'shmhub[cli]'" in err


def test_top_json_on_a_named_segment_with_a_walk_in(shm_path):
    import shmhub

    with shmhub.Host(CFG, path=shm_path) as host:
        link = shmhub.Guest.attach(shm_path)
        try:
            link.send(b"x" * 100, timeout=5)
            rc, out, err = run("top", shm_path, "--json", "--interval", "0.05")
            assert rc == 0, err
            snap = json.loads(out)
            (row,) = snap["guests"]
            assert (row["peer"], row["state"], row["pid"], row["left"]) == (link.peer_id, "Attached", None, 0)  # a walk-in: no pid known
            assert row["g2h_fill"] > 0 and snap["host_goodbye"] is False
            assert [c["slot_size"] for c in snap["classes"]] == [64, 256]
        finally:
            link.close()
        host.segment.unlink()
