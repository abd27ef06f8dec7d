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

import pytest
from killutil import T, assert_left_nothing, assert_pristine, fds, mappings, run_guest, wait_for

from shmhub import _native
from shmhub import layout as L

pytestmark = pytest.mark.skipif(not _native.CRASHPOINTS, reason="not a crash-point build (make crashpoints)")

ROUNDS = int(os.environ.get("CRASHPOINT_ROUNDS", "120"))

CORE = [
    "pop.journaled",
    "pop.taken",
    "pop.owned",
    "pop.allocated",
    "free.journaled",
    "free.marked",
    "free.pushed",
    "commit.written",
    "commit.published",
    "wrap.watermark",
    "read.reset",
    "release.reset",
    "release.done",
    "take.owned",
]
POINTS = (
    [(p, n, "traffic") for p in CORE for n in (1, 3)]
    + [(p, 1, "traffic") for p in ("growth.requested", "growth.mapping", "growth.mapped", "mmap.created", "mmap.sent", "mmap.received", "mmap.mapped")]
    + [(p, 1, mode) for p in ("bootstrap.attached", "bootstrap.claimed") for mode in ("traffic", "bootstrap")]
    + [("bootstrap.response", 1, "bootstrap")]
    + [(p, n, "rpc") for p in ("rpc.staged", "rpc.header_sent", "rpc.buffer_sent") for n in (1, 2)]
)


@pytest.mark.parametrize("point,count,mode", POINTS, ids=[f"{p}:{n}-{m}" for p, n, m in POINTS])
def test_guest_aborted_at_a_crash_point_leaves_nothing_behind(host, point, count, mode):
    host, sock = host
    clean = {k: v for k, v in os.environ.items() if k != "SHMHUB_CRASH_AT"}
    # a first guest runs to the end: what a host keeps between guests is in the baseline
    assert run_guest(host, "traffic", 6, clean, sock) == 0
    fds_before, maps_before = fds(), mappings()

    rc = run_guest(host, mode, ROUNDS, {**clean, "SHMHUB_CRASH_AT": f"{point}:{count}"}, sock, take_slots=True)
    assert rc == -signal.SIGABRT, f"the guest exited {rc}: crash point {point}:{count} was never reached"
    assert_left_nothing(host, fds_before, maps_before)
    # the next guest works
    assert run_guest(host, mode if mode != "rpc" else "traffic", ROUNDS, clean, sock) == 0
    assert_pristine(host)


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
        wait_for(lambda: sum(h.alive for h in host.guests) == 1, "one live worker")
        wait_for(
            lambda: all(
                host.segment.peers.state(p) == L.PEER_EMPTY for p in range(1, host.segment.config.max_guests + 1) if p not in {h.peer_id for h in host.guests}
            ),
            "the dead worker's peer entry to be Empty",
        )
        assert_pristine(host)
