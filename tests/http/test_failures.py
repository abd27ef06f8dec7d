"""Failures at the edge: a worker SIGKILLed mid-request (502 for exactly its requests, replaced),
deadlines (504, the ASGI handler cancelled, a stuck WSGI worker replaced), a full queue (503 with
Retry-After), a worker that breaks the protocol (logged, 502, replaced; the front lives on), and
a reload under load with no failed request."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from serverutil import HERE, Server


def get(url: str, path: str, **params: object) -> httpx.Response:
    return httpx.get(url + path, params=params, timeout=20)


def test_a_killed_worker_fails_exactly_its_requests_and_comes_back():
    with Server.cli("apps.star:app", "--workers", "2") as s, cf.ThreadPoolExecutor(6) as ex:
        old = set(s.live_pids())
        futs = [ex.submit(get, s.url, "/sleep", s=1.5) for _ in range(6)]
        h = s.wait_health(lambda h: [w["in_flight"] for w in h["workers"]] == [3, 3])
        victim = h["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        results = [f.result(timeout=20) for f in futs]
        codes = sorted(r.status_code for r in results)
        assert codes == [200, 200, 200, 502, 502, 502], [(r.status_code, r.text) for r in results]
        survivor = (old - {victim}).pop()
        assert {int(r.text) for r in results if r.status_code == 200} == {survivor}
        h = s.wait_health(lambda h: len([w for w in h["workers"] if not w["retiring"]]) == 2)
        new = set(s.live_pids())
        assert victim not in new and survivor in new and h["replaced"] == 1
        assert all(get(s.url, "/").status_code == 200 for _ in range(4))


def test_deadline_gives_504_and_cancels_the_asgi_handler(tmp_path):
    mark = tmp_path / "cancelled"
    with Server.cli("apps.star:app", "--workers", "1", "--timeout", "0.5") as s:
        pid = s.live_pids()[0]
        t0 = time.monotonic()
        r = get(s.url, "/sleep", s=10, mark=str(mark))
        assert r.status_code == 504 and time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        # the file appears before its text is written: wait for the text
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert mark.read_text() == "cancelled"  # the handler saw CancelledError in the worker
        assert s.live_pids() == [pid]  # an ASGI worker is not replaced for a deadline
        assert get(s.url, "/sleep", s=0).status_code == 200


def test_deadline_on_a_stuck_wsgi_handler_replaces_the_worker():
    pytest.importorskip("flask")
    with Server.cli("apps.fl:app", "--workers", "1", "--timeout", "0.5") as s:
        pid = s.live_pids()[0]
        assert get(s.url, "/sleep", s=30).status_code == 504
        h = s.wait_health(lambda h: [w["pid"] for w in h["workers"]] not in ([pid], []) and pid not in [w["pid"] for w in h["workers"]])
        assert len(h["workers"]) == 1 and h["replaced"] == 1
        assert get(s.url, "/sleep", s=0).status_code == 200


def test_a_full_queue_answers_503_with_retry_after():
    with Server.cli("apps.star:app", "--workers", "1", "--max-in-flight", "1", "--queue", "1") as s, cf.ThreadPoolExecutor(2) as ex:
        first = ex.submit(get, s.url, "/sleep", s=1.0)
        s.wait_health(lambda h: h["workers"][0]["in_flight"] == 1)
        queued = ex.submit(get, s.url, "/sleep", s=0)
        s.wait_health(lambda h: h["queued"] == 1)
        r = get(s.url, "/")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert first.result(20).status_code == 200 and queued.result(20).status_code == 200
        assert get(s.url, "/").status_code == 200


ROGUE = f"""
import sys
from shmhub.http import serve
serve("unused:app", workers=1, bind="127.0.0.1:0", timeout=10,
      worker_argv=[sys.executable, {os.path.join(HERE, "rogue_worker.py")!r}])
"""


@pytest.mark.parametrize("path", ["/malformed", "/badshape", "/unknown-id"])
def test_a_worker_breaking_the_protocol_is_logged_and_replaced_never_crashing_the_front(path):
    with Server.python(ROGUE) as s:
        pid = s.live_pids()[0]
        r = get(s.url, path)
        assert r.status_code == 502
        s.wait_log("protocol error from worker")
        s.wait_health(lambda h: [w["pid"] for w in h["workers"] if not w["retiring"]] not in ([pid], []))
        assert get(s.url, "/").json() == {"hello": "world"}  # the front and a new worker serve on
        assert s.proc.poll() is None


def test_reload_under_load_fails_no_request():
    with Server.cli("apps.star:app", "--workers", "2") as s, cf.ThreadPoolExecutor(8) as ex:
        old = set(s.live_pids())
        futs = [ex.submit(get, s.url, "/sleep", s=0.05) for _ in range(160)]
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGHUP)
        codes = [f.result(timeout=30).status_code for f in futs]
        assert codes == [200] * len(futs)
        h = s.wait_health(lambda h: h["generation"] == 1 and len(h["workers"]) == 2)
        assert not old & {w["pid"] for w in h["workers"]}
        assert get(s.url, "/").status_code == 200


def test_sigterm_lets_requests_in_flight_finish_then_exits():
    s = Server.cli("apps.star:app", "--workers", "1")
    try:
        with cf.ThreadPoolExecutor(1) as ex:
            fut = ex.submit(get, s.url, "/sleep", s=0.5)
            s.wait_health(lambda h: h["workers"][0]["in_flight"] == 1)
            s.proc.send_signal(signal.SIGTERM)
            assert fut.result(20).status_code == 200
    finally:
        code = s.stop()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in s.log


def test_an_app_that_does_not_import_stops_the_front_with_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-m", "shmhub", "serve", "no_such_module:app", "--bind", "127.0.0.1:0"], cwd=HERE, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert "ModuleNotFoundError: No module named 'no_such_module'" in out.stderr
    assert "workers did not start" in out.stderr
