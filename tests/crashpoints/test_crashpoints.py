"""Kill anywhere: a guest aborts at each deterministic crash point in turn, and recovery must
leave nothing behind (docs/hardening.md).

The points are compiled in only by a crash-point build (`make crashpoints`: SHMHUB_CRASHPOINTS=1,
its own venv); elsewhere these tests skip. For each point (and pass count) a guest runs a workload
through it under SHMHUB_CRASH_AT=point:count and aborts there. Then:
  - the guest died of the abort (SIGABRT), so the point was reached, and the host noticed;
  - every slot of every class, every extent included, is Free and on its free list (nothing
    lost, nothing twice), once the host has released what it holds;
  - every peer entry is Empty again (a reserved or attached peer is released);
  - no mapping of the mmap tier is left in the host, and the host has the fds it had before;
  - a next guest on the recovered segment runs the whole workload.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import List

import pytest

from shmhub import Host, SegmentConfig, rpc
from shmhub import _native
from shmhub import layout as L
from shmhub.errors import ShmhubError

pytestmark = pytest.mark.skipif(not _native.CRASHPOINTS, reason="not a crash-point build (make crashpoints)")

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(os.path.dirname(HERE), "guests", "crashpoint_guest.py")

T = 20.0
ROUNDS = int(os.environ.get("CRASHPOINT_ROUNDS", "120"))
# A small ring (wraps within a run), growable slot classes (the host takes their free slots before
# the crashing guest starts, so it must ask for growth), a largest slot of 16 KiB (bigger payloads
# take the mmap tier).
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=256, inline_threshold=64,
                       size_classes=((256, 16), (4096, 4, 4), (16384, 4, 4)))

CORE = ["pop.journaled", "pop.taken", "pop.owned", "pop.allocated",
        "free.journaled", "free.marked", "free.pushed",
        "commit.written", "commit.published", "wrap.watermark",
        "read.reset", "release.reset", "release.done", "take.owned"]
POINTS = (
    [(p, n, "traffic") for p in CORE for n in (1, 3)]
    + [(p, 1, "traffic") for p in ("growth.requested", "growth.mapping", "growth.mapped",
                                   "mmap.created", "mmap.sent", "mmap.received", "mmap.mapped")]
    + [(p, 1, mode) for p in ("bootstrap.attached", "bootstrap.claimed") for mode in ("traffic", "bootstrap")]
    + [("bootstrap.response", 1, "bootstrap")]
    + [(p, n, "rpc") for p in ("rpc.staged", "rpc.header_sent", "rpc.buffer_sent") for n in (1, 2)]
)


def _fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("shmhub-map" in line for line in f)


def _wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + T
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _echo(h) -> None:
    """Host side of the traffic workload: echo each message until the guest is gone, and receive
    (and release) to the end what it sent before it died: recovery keeps those in the link's backlog."""
    gone = False
    while True:
        try:
            msg = h.link.recv(timeout=T)
        except ShmhubError:
            return
        data = bytes(msg)
        msg.release()
        if not gone:
            try:
                h.link.send(data, timeout=T)
            except ShmhubError:
                gone = True


def _attached(host: Host, events: list):
    """The handle of the guest that attached through the bootstrap socket."""
    while True:
        ev = host.events.get(timeout=T)
        events.append(ev)
        if ev.kind == "attached":  # None if it is gone already (recovery then waited for below)
            return next((g for g in host.guests if g.peer_id == ev.peer_id), None)


def _hog(host: Host) -> list:
    """Take every free slot of the growable classes (as the host): the guest's first slot sends
    then find them exhausted and ask the host to grow them."""
    pool, refs = host.segment.pool, []
    for c in (1, 2):
        while (ref := pool.alloc_in_class(c, 0)) is not None:
            refs.append(ref)
    return refs


def _run_guest(host: Host, mode: str, rounds: int, env: dict, sock: str, hog: bool = False):
    """Start a guest in `mode` and serve it until it ends; returns (returncode, events seen)."""
    hogged = _hog(host) if hog else []
    events: list = []
    server = None
    if mode == "bootstrap":
        import subprocess

        proc = subprocess.Popen([sys.executable, GUEST, mode, sock, str(rounds)], env=env)
        try:
            h = _attached(host, events)
            if h is not None:
                _echo(h)
            rc = proc.wait(T)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    else:
        h = host.spawn([sys.executable, GUEST, mode, str(rounds)], env=env)
        if mode == "rpc":
            server = rpc.Server({"sink": lambda a, b: len(bytes(a)) + len(bytes(b))})
            server.attach(h.link)
        else:
            _echo(h)
        rc = h.wait(T)
    if h is not None:
        _wait_for(lambda: h.recovered, "the host to recover the guest")
    for ref in hogged:
        host.segment.pool.free(*ref)
    if server is not None:
        server.close()
    return rc, events


def _assert_pristine(host: Host) -> None:
    seg = host.segment
    seg.refresh_extents()
    pool = seg.pool
    for c in range(pool.num_classes):
        free, allocated = pool.counts(c)
        _, count = pool.class_info(c)
        held = {(e, s): pool.slot_meta(c, s, e) for e in range(pool.mapped_extents(c)) for s in range(count)
                if pool.slot_meta(c, s, e)[1] != L.SLOT_FREE}
        assert allocated == 0, f"class {c}: {allocated} slots still allocated: (gen, state, owner, next) {held}"
        _, idx = pool.free_head(c)
        seen = set()
        while idx != L.EMPTY_INDEX:
            assert idx not in seen, f"class {c}: slot {idx} twice on the free list"
            seen.add(idx)
            idx = pool.slot_meta(c, idx % count, idx // count)[3]
        assert len(seen) == free == count * pool.mapped_extents(c), \
            f"class {c}: {len(seen)} slots listed, {free} free, {count * pool.mapped_extents(c)} in all"


@pytest.fixture
def host(tmp_path):
    with Host(CONFIG) as h:
        sock = str(tmp_path / "hub.sock")
        h.listen(sock)
        yield h, sock


@pytest.mark.parametrize("point,count,mode", POINTS, ids=[f"{p}:{n}-{m}" for p, n, m in POINTS])
def test_guest_aborted_at_a_crash_point_leaves_nothing_behind(host, point, count, mode):
    host, sock = host
    clean = {k: v for k, v in os.environ.items() if k != "SHMHUB_CRASH_AT"}
    # a first guest runs to the end: what a host keeps between guests is in the baseline
    assert _run_guest(host, "traffic", 6, clean, sock)[0] == 0
    fds, maps = _fds(), _mappings()

    rc, events = _run_guest(host, mode, ROUNDS, {**clean, "SHMHUB_CRASH_AT": f"{point}:{count}"}, sock, hog=True)
    assert rc == -signal.SIGABRT, f"the guest exited {rc}: crash point {point}:{count} was never reached"

    seg = host.segment
    _wait_for(lambda: all(seg.peers.state(p) == L.PEER_EMPTY for p in range(1, CONFIG.max_guests + 1)),
              "every peer entry to be Empty")
    _assert_pristine(host)
    _wait_for(lambda: _mappings() == maps, "the dead guest's mappings to be closed")
    _wait_for(lambda: _fds() == fds, "the host's fds to be back to what they were")
    # the next guest works
    assert _run_guest(host, mode if mode != "rpc" else "traffic", ROUNDS, clean, sock)[0] == 0
    _assert_pristine(host)


@pytest.mark.parametrize("point", ["executor.task", "executor.done"])
def test_worker_aborted_at_a_task_crash_point_fails_that_task_only(point, monkeypatch):
    """A worker aborts inside a task (before it runs the function, or after, before the result is
    sent): that task fails with WorkerCrashed, the executor's pool is whole again, a replacement
    worker runs the next tasks (with payloads big enough for slots and mappings)."""
    from shmhub import Executor
    from shmhub.errors import WorkerCrashed

    import crash_tasks

    monkeypatch.setenv("SHMHUB_CRASH_AT", f"{point}:1")
    with Executor(max_workers=1, mp_context="spawn") as ex:
        monkeypatch.delenv("SHMHUB_CRASH_AT")  # the replacement worker starts without it
        first = ex.submit(crash_tasks.double, b"x" * 3000)
        with pytest.raises(WorkerCrashed) as crashed:
            first.result(T)
        assert "SIGABRT" in str(crashed.value)  # the crash point, nothing else
        for n in (10, 3000, 300_000):
            value, pid = ex.submit(crash_tasks.double, b"y" * n).result(T)
            assert value == b"y" * 2 * n
        host = ex._host
        _wait_for(lambda: sum(h.alive for h in host.guests) == 1, "one live worker")
        _wait_for(lambda: all(host.segment.peers.state(p) == L.PEER_EMPTY
                              for p in range(1, host.segment.config.max_guests + 1) if p not in {h.peer_id for h in host.guests}),
                  "the dead worker's peer entry to be Empty")
        _assert_pristine(host)
