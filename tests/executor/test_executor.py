"""shmhub.Executor: the concurrent.futures contract, crash isolation, deadlines, stop(), shared arrays."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

import shmhub
from shmhub import Executor, Host
from shmhub.errors import ExecutorBroken, TaskStopped, TaskTimeout, WorkerCrashed

import tasks

T = 20.0


def wait_until(pred, what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def ex():
    with Executor(2) as e:
        yield e


def test_submit_map_and_kwargs(ex):
    assert ex.submit(tasks.add, 1, 2).result(T) == 3
    assert ex.submit(tasks.add, 1, b=5).result(T) == 6
    assert list(ex.map(tasks.add, range(10), range(10), timeout=T)) == [2 * i for i in range(10)]
    n = 10_000  # long enough to be chunked automatically: results stay in order
    assert list(ex.map(tasks.add, range(n), range(n), timeout=T)) == [2 * i for i in range(n)]
    assert list(ex.map(tasks.add, range(7), chunksize=3, timeout=T)) == list(range(7))
    assert list(ex.map(tasks.add, [], timeout=T)) == []


def test_exception_keeps_its_type_and_the_remote_traceback(ex):
    with pytest.raises(ValueError, match="nope") as info:
        ex.submit(tasks.boom, "nope").result(T)
    assert "in boom" in str(info.value.__cause__)  # _RemoteTraceback, as concurrent.futures does


def test_map_timeout_and_error_cancel_the_rest(ex):
    it = ex.map(tasks.sleep, [0.0, 5.0], timeout=0.3)
    assert next(it) is None
    with pytest.raises(cf.TimeoutError):
        next(it)
    with pytest.raises(ValueError):
        list(ex.map(tasks.boom, ["x", "y"], timeout=T))


def test_pickling_errors_fail_that_future_alone(ex):
    with pytest.raises(Exception, match="pickle|lambda"):
        ex.submit(tasks.add, lambda: 1, 2).result(T)
    with pytest.raises(Exception, match="pickle|lambda"):
        ex.submit(tasks.unpicklable_result).result(T)
    assert ex.submit(tasks.add, 2, 2).result(T) == 4


def test_futures_work_with_wait_as_completed_and_asyncio(ex):
    fs = [ex.submit(tasks.add, i, i) for i in range(20)]
    assert sorted(f.result() for f in cf.as_completed(fs, timeout=T)) == [2 * i for i in range(20)]
    done, _ = cf.wait([ex.submit(tasks.add, 1, 1)], timeout=T)
    assert len(done) == 1

    async def go():
        loop = asyncio.get_running_loop()
        a = await asyncio.wait_for(asyncio.wrap_future(ex.submit(tasks.add, 3, 4)), T)
        b = await asyncio.wait_for(loop.run_in_executor(ex, tasks.add, 5, 6), T)
        return a, b

    assert asyncio.run(go()) == (7, 11)


def test_a_waiting_caller_reads_its_answer_itself(ex):
    """result() reads the worker's link in the caller's thread while no other thread does, so
    the answer settles the future there (no wake-up of the caller by the rpc reader thread). A
    timeout still holds while it reads, and the read role is handed back."""
    me = threading.current_thread()
    settled_by = []
    for i in range(200):
        f = ex.submit(tasks.add, i, 1)
        f.add_done_callback(lambda f: settled_by.append(threading.current_thread()))
        assert f.result(T) == i + 1
    assert me in settled_by, "no answer was read by the waiting thread"
    f = ex.submit(tasks.sleep, 1.0, "late")
    t0 = time.monotonic()
    with pytest.raises(cf.TimeoutError):
        f.result(0.2)
    assert time.monotonic() - t0 < 0.9
    assert f.result(T) == "late"
    assert all(w.client._conn.role is not me for w in ex._workers.values())


def test_a_round_trip_does_not_call_the_reader_thread():
    """A task is sent quiet: its caller reads the answer in result(), and the rpc reader thread is
    not woken for it (a thread hand-off on every round trip, the larger part of its latency)."""
    with Executor(1) as ex:
        for _ in range(10):
            ex.submit(tasks.add, 1, 1).result(T)
        conn = ex._workers[next(iter(ex._workers))].client._conn
        wait_until(lambda: conn.role is None, "the read role free after the warm-up")
        calls = []
        notify = conn._role_cond.notify
        conn._role_cond.notify = lambda n=1: (calls.append(n), notify(n))
        try:
            for i in range(100):
                assert ex.submit(tasks.add, i, 1).result(T) == i + 1
        finally:
            del conn._role_cond.notify
        assert calls == []


@pytest.mark.parametrize("observe", ["done", "callback", "wait", "as_completed", "asyncio", "result_elsewhere"])
def test_a_task_nobody_reads_for_still_completes(observe):
    """Whatever waits for a quiet task without reading its worker's link (polling done(), a done
    callback, wait(), as_completed(), asyncio, result() while another thread reads) has the
    reader thread read for it: no hang."""
    with Executor(1) as ex:
        ex.submit(tasks.add, 0, 0).result(T)
        f = ex.submit(tasks.add, 2, 3)
        if observe == "done":
            wait_until(f.done, "done() became true")
        elif observe == "callback":
            ev = threading.Event()
            f.add_done_callback(lambda _: ev.set())
            assert ev.wait(T)
        elif observe == "wait":
            assert cf.wait([f], T).done == {f}
        elif observe == "as_completed":
            assert list(cf.as_completed([f], T)) == [f]
        elif observe == "asyncio":

            async def go():
                return await asyncio.wait_for(asyncio.wrap_future(f), T)

            assert asyncio.run(go()) == 5
        else:
            slow = ex.submit(tasks.sleep, 0.5, "slow")  # behind f: read by the thread below
            reader = threading.Thread(target=slow.result, args=(T,))
            reader.start()
            wait_until(lambda: ex._workers[next(iter(ex._workers))].client._conn.role is reader, "the other thread reads")
            assert f.result(T) == 5
            reader.join(T)
        assert f.result(0) == 5


def test_unread_answers_are_bounded_and_queued_tasks_still_flow():
    """At most QUIET_MAX calls per worker go unread; tasks queued behind full workers have the
    reader take the answers that make room (nobody calls result() until the end)."""
    from shmhub.rpc._conn import QUIET_MAX

    with Executor(2, queue_depth=2) as ex:
        ex.submit(tasks.add, 0, 0).result(T)
        fs = [ex.submit(tasks.add, i, 1) for i in range(200)]
        assert all(len(w.client._conn.calls.quiet) <= QUIET_MAX for w in ex._workers.values())
        wait_until(lambda: sum(f._state != "FINISHED" for f in fs) <= 2 * QUIET_MAX, "the tasks answered, nobody asking")
        wait_until(lambda: all(f.done() for f in fs), "done() has the rest read")
        assert [f.result(0) for f in fs] == [i + 1 for i in range(200)]


MAIN_SCRIPT = """
import os
with open(os.environ["RUNS"], "a") as f:
    f.write("main\\n")
import helper_beside  # a module next to the script, preloaded too
def pid():
    return os.getpid()
if __name__ == "__main__":
    import shmhub
    with shmhub.Executor(2, max_tasks_per_child=1, preload=("helper_beside",)) as ex:
        print(len({ex.submit(pid).result(60) for _ in range(6)}))
"""


def test_a_script_main_runs_once_in_the_template_not_in_every_worker(tmp_path):
    """multiprocessing's forkserver never gets the main path or sys.path it is meant to: every new
    worker ran the script again (runpy), and a preloaded module beside the script was silently
    not preloaded. The executor's template now imports both once; workers find them in place."""
    import subprocess
    import sys

    (tmp_path / "main.py").write_text(MAIN_SCRIPT)
    (tmp_path / "helper_beside.py").write_text("import os\nwith open(os.environ['RUNS'], 'a') as f:\n    f.write('helper\\n')\n")
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS": str(runs)}
    out = subprocess.run([sys.executable, str(tmp_path / "main.py")], env=env, cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == 6  # a fresh worker per task (max_tasks_per_child=1)
    # once in the program, once in the template: not in each of the 8 or more workers
    assert sorted(runs.read_text().split()) == ["helper", "helper", "main", "main"]


def test_an_answer_read_before_the_executor_attached_its_callback(monkeypatch):
    """The reader thread may read a task's answer before the sending thread has attached the
    executor's callback to the rpc call; the task is then settled from the sending thread. A
    caller that began waiting in between must not be left asleep on the link (it hung so in
    nested executors: nothing more ever arrived to wake it)."""
    from shmhub.rpc import Client

    with Executor(1, queue_depth=1) as ex:
        first = ex.submit(tasks.sleep, 0.3, "first")  # holds the worker: the next task is sent by the manager thread
        orig = Client._start
        window = threading.Event()

        def start(self, method, args, on_item=None, quiet=False):
            call = orig(self, method, args, on_item)  # not quiet: the reader thread reads the answer
            wait_until(lambda: call.future.done() and self._conn.role is None, "the answer read by the reader thread")
            window.set()  # answered and read, the executor's callback not attached yet
            time.sleep(0.3)  # the caller starts waiting meanwhile
            return call

        monkeypatch.setattr(Client, "_start", start)
        second = ex.submit(tasks.add, 2, 3)
        assert first.result(T) == "first"
        assert window.wait(T)
        got = []
        waiter = threading.Thread(target=lambda: got.append(second.result()))  # no timeout: a lost wake-up hangs
        waiter.start()
        waiter.join(T)
        assert got == [5], "the caller was left asleep on the link"


def test_a_dead_worker_fails_only_the_task_it_ran():
    with Executor(2) as ex:
        pids = {ex.submit(tasks.pid).result(T) for _ in range(4)}
        slow = [ex.submit(tasks.sleep, 0.3, i) for i in range(4)]
        dead = ex.submit(tasks.exit_with, 7)
        killed = ex.submit(tasks.kill_self)
        after = [ex.submit(tasks.add, i, 1) for i in range(20)]
        with pytest.raises(WorkerCrashed, match="exited with status 7"):
            dead.result(T)
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            killed.result(T)
        assert [f.result(T) for f in slow] == [0, 1, 2, 3]
        assert [f.result(T) for f in after] == list(range(1, 21))
        st = ex.stats()
        assert st["crashed"] == 2 and st["restarts"] >= 2
        wait_until(lambda: len(ex.stats()["workers"]) == 2, "both workers replaced")
        assert not {w["pid"] for w in ex.stats()["workers"]} & pids


def test_killed_worker_is_noticed_within_milliseconds():
    with Executor(2) as ex:
        worker_pid = ex.submit(tasks.pid).result(T)
        fut = None
        for _ in range(50):  # until the sleeping task lands on that worker
            f = ex.submit(tasks.sleep, 30.0)
            time.sleep(0.05)
            running_on = {w["pid"] for w in ex.stats()["workers"] if w["in_flight"]}
            if worker_pid in running_on:
                fut = f
                break
            ex.stop(f)
        assert fut is not None
        t0 = time.monotonic()
        os.kill(worker_pid, 9)
        with pytest.raises(WorkerCrashed):
            fut.result(T)
        assert time.monotonic() - t0 < 1.0  # ~2-5 ms here: generous for a loaded machine
        ex.stop(fut)


def test_retries_resubmit_a_task_whose_worker_crashed(tmp_path):
    with Executor(2) as ex:
        marker = str(tmp_path / "once")
        assert isinstance(ex.options(retries=1).submit(tasks.crash_once, marker).result(T), int)
        assert ex.stats()["retried"] == 1
        os.unlink(marker)
        with pytest.raises(WorkerCrashed):
            ex.options(retries=0).submit(tasks.crash_once, marker).result(T)


@pytest.mark.parametrize("fn", [tasks.spin, tasks.sleep])
def test_deadline_stops_the_task_and_nothing_else(fn):
    with Executor(2) as ex:
        other = ex.submit(tasks.sleep, 0.6, "other")
        t0 = time.monotonic()
        f = ex.options(timeout=0.3).submit(fn, 30.0)
        with pytest.raises(TaskTimeout) as info:
            f.result(T)
        late = time.monotonic() - t0 - 0.3
        assert isinstance(info.value, TimeoutError)
        assert late < 0.5, f"stopped {late * 1e3:.0f} ms late"
        assert other.result(T) == "other"
        assert ex.options(timeout=5).submit(tasks.add, 1, 1).result(T) == 2
        assert ex.stats()["timed_out"] == 1


def test_stop_a_running_task_and_cancel_a_pending_one():
    with Executor(1) as ex:
        running = ex.submit(tasks.sleep, 30.0)
        queued = ex.submit(tasks.sleep, 30.0)  # sent behind it (queue depth 2)
        pending = ex.submit(tasks.add, 1, 1)  # still in the executor's queue
        time.sleep(0.2)
        assert ex.stop(pending) and pending.cancelled()
        assert ex.stop(queued)
        assert ex.stop(running)
        with pytest.raises(TaskStopped):
            running.result(T)
        with pytest.raises(TaskStopped):
            queued.result(T)
        assert ex.submit(tasks.add, 2, 2).result(T) == 4


def test_shutdown_cancel_futures_and_no_new_work():
    ex = Executor(1)
    running = ex.submit(tasks.sleep, 0.3, "done")
    rest = [ex.submit(tasks.sleep, 0.3) for _ in range(10)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.result(0) == "done"
    assert sum(f.cancelled() for f in rest) >= 8  # at most one more was already sent
    with pytest.raises(RuntimeError, match="shutdown"):
        ex.submit(tasks.add, 1, 1)


def test_initializer_runs_in_every_worker():
    with Executor(2, initializer=tasks.init_env, initargs=("hello",)) as ex:
        assert set(ex.map(tasks.state, range(8), timeout=T)) == {"hello"}


def test_initializer_failure_breaks_the_executor_without_respawning():
    ex = Executor(2, initializer=tasks.init_fail)
    try:
        fs = []
        for _ in range(6):
            try:
                fs.append(ex.submit(tasks.add, 1, 1))
            except ExecutorBroken:  # the first worker's init answered already
                break
        for f in fs:
            with pytest.raises(ExecutorBroken):  # sent ones are refused by the worker, the rest fail here
                f.result(T)
        with pytest.raises(ExecutorBroken, match="initializer"):
            ex.submit(tasks.add, 1, 1)
        assert isinstance(ExecutorBroken("x"), cf.BrokenExecutor)
        assert ex.stats()["restarts"] == 0
    finally:
        ex.shutdown()


def test_fork_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="fork"):
        Executor(1, mp_context=multiprocessing.get_context("fork"))


def test_spawn_context_works():
    with Executor(1, mp_context="spawn") as ex:
        assert ex.submit(tasks.add, 20, 22).result(T) == 42


def test_max_tasks_per_child_recycles_workers():
    # 2 workers, 4 peer entries: 40 workers come and go, so retired ones must leave and free theirs
    with Executor(2, max_tasks_per_child=5, config=shmhub.SegmentConfig(max_guests=4)) as ex:
        pids = [ex.submit(tasks.pid).result(T) for _ in range(40)]
        assert len(set(pids)) >= 8
        assert list(ex.map(tasks.add, range(100), timeout=T, chunksize=1)) == list(range(100))
        live = {w["pid"] for w in ex.stats()["workers"]}
        for p in set(pids) - live:  # retired workers exited (their peer entries were reused)
            wait_until(lambda: not os.path.exists(f"/proc/{p}/status") or "zombie" in open(f"/proc/{p}/status").read(), f"retired worker {p} exits")


def test_shared_arrays_travel_by_reference_both_ways(ex):
    a = ex.zeros(1_000_000)
    assert ex.submit(tasks.fill, a, 3.0).result(T) is None
    assert a.sum() == 3_000_000  # the worker wrote into our memory
    assert ex.submit(tasks.total, a[10:20]).result(T) == 30.0  # a view travels as a view
    half = ex.submit(tasks.halve, a).result(T)
    assert half.shape == (500_000,)
    half[0] = -1.0  # the result is our memory, not a copy
    assert a[0] == -1.0
    private = np.arange(8 << 20, dtype=np.float64)  # 64 MiB of private memory: one copy, out of band
    assert ex.submit(tasks.total, private).result(T) == float(private.sum())
    big = ex.submit(np.ones, 8 << 20).result(T)  # a 64 MiB result
    assert big.shape == (8 << 20,) and big[-1] == 1.0


def test_a_shared_array_reaches_four_tasks_without_copies():
    n = 256 << 20  # bytes; the slow variant uses 1 GiB
    _shared_without_copies(n)


@pytest.mark.slow
def test_a_1gib_shared_array_reaches_four_tasks_without_copies():
    _shared_without_copies(1 << 30)


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem in /proc/meminfo")


def _shared_without_copies(nbytes: int) -> None:
    with Executor(4) as ex:
        a = ex.empty(nbytes // 8)
        a[:] = 1.0
        before = _shmem_kib()
        fs = [ex.submit(tasks.total, a) for _ in range(4)]
        assert [f.result(T) for f in fs] == [float(nbytes // 8)] * 4
        grown = (_shmem_kib() - before) * 1024
        assert grown < nbytes // 2, f"shared memory grew by {grown >> 20} MiB for 4 tasks"


def test_nested_executors_work():
    with Executor(1) as ex:
        assert ex.submit(tasks.nested, 5).result(60) == [0, 2, 4, 6, 8]


def test_executor_dropped_without_shutdown_stops_its_workers():
    ex = Executor(1)
    pid = ex.submit(tasks.pid).result(T)
    manager = ex._manager.thread
    del ex
    import gc

    gc.collect()
    manager.join(T)
    assert not manager.is_alive()
    with pytest.raises(ProcessLookupError):
        for _ in range(200):
            os.kill(pid, 0)
            time.sleep(0.05)


def test_dask_runs_the_same_code():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2) as client:
        ex = client.get_executor()
        assert ex.submit(tasks.add, 1, 2).result(T) == 3
        assert list(ex.map(tasks.add, range(5), range(5))) == [0, 2, 4, 6, 8]


def test_a_dropped_result_gives_its_shared_memory_back_at_once():
    """The executor must not keep a result alive after the caller dropped it (it did, through its
    rpc future, until the cycle collector ran): else every large result needs a fresh mapping."""
    import gc

    with Executor(1) as ex:
        gc.disable()
        try:
            for _ in range(6):
                r = ex.submit(np.ones, 4 << 20).result(T)  # 32 MiB: the mmap tier
                assert r[-1] == 1.0
                del r
            link = ex._host.guests[0].link
            wait_until(lambda: link.mappings["rx_mappings"] <= 2, "mappings reused, not piled up")
        finally:
            gc.enable()


def test_exit_status_survives_concurrent_active_children():
    # multiprocessing's own child polling (active_children(), every Process.start()) raced the host's
    # and lost a SIGKILLed worker's status: "exited with status 255" (forkserver EOF). The host's
    # guest processes are no longer on multiprocessing's child list.
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            multiprocessing.active_children()

    ctx = multiprocessing.get_context("forkserver")
    with Host() as host:
        g = host.start_process(tasks.sleep, (30,), context=ctx)
        assert g.process._proc not in multiprocessing.active_children()
        t = threading.Thread(target=hammer)
        t.start()
        try:
            g.kill()
            assert g.wait(T) == -signal.SIGKILL
        finally:
            stop.set()
            t.join(T)


def test_quick_tasks_go_several_to_a_call_and_each_keeps_its_own_outcome():
    # A burst of trivial tasks queues faster than 2 workers answer: they are sent in run_batch
    # calls. Within them a failing task fails alone (with its remote traceback), one whose
    # arguments do not pickle fails alone, and a worker that dies fails only the task it was
    # running; the rest of its batch runs elsewhere.
    n = 3000
    with Executor(2) as ex:
        futures = []
        for i in range(n):
            if i == 500:
                futures.append(ex.submit(tasks.add, threading.Lock(), 1))  # does not pickle
            elif i == 1000:
                futures.append(ex.submit(tasks.boom, "task 1000"))
            elif i == 2000:
                futures.append(ex.submit(tasks.kill_self))
            else:
                futures.append(ex.submit(tasks.add, i, 1))
        for i, f in enumerate(futures):
            if i == 500:  # a batch that does not encode is sent task by task: this one alone fails
                with pytest.raises(TypeError, match="pickle"):
                    f.result(T)
            elif i == 1000:
                with pytest.raises(ValueError, match="task 1000") as info:
                    f.result(T)
                assert "in boom" in str(info.value.__cause__)
            elif i == 2000:
                with pytest.raises(WorkerCrashed, match="SIGKILL"):
                    f.result(T)
            else:
                assert f.result(T) == i + 1
        st = ex.stats()
        # How many go in batches depends on the measured time per task (a loaded machine makes
        # batches smaller), but a burst of 3000 always leaves some to be sent together.
        assert st["batched"] > 0, st
        assert (st["completed"], st["failed"], st["crashed"]) == (n - 3, 2, 1), st
