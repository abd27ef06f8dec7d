"""Executor(listen=...) with remote workers (`shmhub worker URL`) beside local ones: tasks run on
both, a remote worker killed or stopped mid-task fails only its own task (WorkerCrashed), and
shutdown ends the remote worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from remoteutil import HERE, LIVENESS, T

import rtasks
from shmhub import Executor, TaskTimeout, WorkerCrashed


def start_worker(url: str) -> "subprocess.Popen[bytes]":
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]), **{rtasks.REMOTE: "1"})
    return subprocess.Popen([sys.executable, "-m", "shmhub", "worker", url, "--liveness", str(LIVENESS), "--name", "rw"], env=env)


def wait_remote(ex: Executor, n: int = 1) -> None:
    deadline = time.monotonic() + T
    while sum(w["remote"] for w in ex.stats()["workers"]) < n:
        assert time.monotonic() < deadline, "the remote worker did not join"
        time.sleep(0.01)


@pytest.fixture
def pool():
    ex = Executor(1, listen="tcp://127.0.0.1:0", listen_options={"liveness": LIVENESS})
    proc = start_worker(ex.address)
    try:
        wait_remote(ex)
        yield ex, proc
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
        try:
            proc.wait(T)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(T)


def test_tasks_run_on_local_and_remote_workers(pool):
    ex, proc = pool
    assert ex.address.startswith("tcp://127.0.0.1:")
    futs = [ex.submit(rtasks.hold, 0.05, 0.05) for _ in range(8)]
    kinds = {f.result(T)[0] for f in futs}
    assert kinds == {"local", "remote"}
    assert ex.submit(rtasks.total, np.ones(100_000)).result(T) == 100_000.0  # arrays go by value
    shared = ex.zeros(1000)  # a shared-memory array reaches a remote worker as a copy
    shared += 2
    assert sorted(ex.map(rtasks.total, [shared] * 4)) == [2000.0] * 4
    assert [r[2] for r in ex.map(rtasks.where, range(20), chunksize=3)] == list(range(20))


def test_shutdown_ends_the_remote_worker(pool):
    ex, proc = pool
    assert ex.submit(rtasks.where).result(T)[0] in ("local", "remote")
    ex.shutdown(wait=True)
    assert proc.wait(T) == 0


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_remote_worker_lost_mid_task_fails_only_its_task(pool, how):
    ex, proc = pool
    first = ex.submit(rtasks.hold, 0.3, 0.3)  # a tie goes to the local worker
    doomed = ex.submit(rtasks.hold, 0.3, 60)  # the remote one, idle
    queued = [ex.submit(rtasks.hold, 0.01, 60) for _ in range(3)]
    time.sleep(0.2)
    assert [w["in_flight"] > 0 for w in ex.stats()["workers"]] == [True, True]
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    try:
        with pytest.raises(WorkerCrashed, match="lost its connection"):
            doomed.result(T)
        assert time.monotonic() - t0 < LIVENESS + 1.5
        assert first.result(T)[0] == "local"
        assert all(f.result(T)[0] == "local" for f in queued)  # those queued on it ran elsewhere
        assert ex.stats()["crashed"] == 1
    finally:
        if how == "stop":
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()


def test_a_remote_task_past_its_timeout_fails_with_task_timeout_and_its_worker_leaves(pool):
    ex, proc = pool
    first = ex.options(timeout=5).submit(rtasks.hold, 0.1, 0.1)  # a tie goes to the local worker
    late = ex.options(timeout=0.3).submit(rtasks.hold, 0.1, 1.5)  # the remote one: runs too long
    t0 = time.monotonic()
    with pytest.raises(TaskTimeout):
        late.result(T)
    assert time.monotonic() - t0 < 2
    assert first.result(T)[0] == "local"
    assert proc.wait(T) == 0  # its link closed: it exits once the task returns
    assert not any(w["remote"] for w in ex.stats()["workers"])
