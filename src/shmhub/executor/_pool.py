"""Workers, tasks, and the manager thread that starts, watches and replaces workers.

Data flow:

    submit() --------> pending (deque) --pump--> worker.tasks (sent, unanswered; the first runs)
                                                     |  rpc "run" / "run_chunk" over the link
    future settled <-- _answered (rpc reader) <------+
    host event "died"/"exited", rpc PeerDead --> manager: _settle_lost(worker)
        first task: WorkerCrashed / TaskTimeout / TaskStopped, or resubmitted (retries)
        the others never started: back to the front of pending; a new worker is started

A worker runs its tasks one at a time in the order sent (rpc.inline on its side), so the task
running when it dies is the oldest one sent and not answered: exactly that one fails.
The manager sleeps on a condition until a worker is lost, a deadline comes, or work is pending
while a worker has room; it never wakes on a tick."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Tuple

from ..errors import HostGone, LinkClosed, LinkCorrupted, PeerDead
from ..rpc import Client
from ..rpc._conn import CallFuture
from ..rpc._future import DONE, LazyFuture
from ._shared import TaskCodec, fd_socketpair, send_attach

if TYPE_CHECKING:
    import socket

    from ..host import GuestHandle
    from ..remote import RemoteGuest
    from ._executor import Executor

__all__ = ["Manager", "Task", "TaskFuture", "Worker", "exit_reason", "make_remote_worker", "make_worker", "settle", "wait_settled"]

log = logging.getLogger("shmhub.executor")

_GONE = (PeerDead, HostGone, LinkClosed, LinkCorrupted)
EXIT_WAIT = 5.0  # bound on waiting for a lost worker's last answers and its exit status


def settle(fut: "cf.Future[Any]", value: Any = None, exc: Optional[BaseException] = None) -> None:
    """Resolve a future unless it already is (its state decides, never a check beforehand)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    except cf.InvalidStateError:
        pass


def wait_settled(futures: List[CallFuture], timeout: float) -> None:
    """Wait until every one of these rpc calls is settled, or timeout."""
    end = time.monotonic() + timeout
    for f in futures:
        try:
            f.exception(max(0.0, end - time.monotonic()))
        except (cf.TimeoutError, cf.CancelledError):
            pass


class _Waiters(list):  # type: ignore[type-arg]
    """A TaskFuture's waiter list: concurrent.futures.wait() and as_completed() append to it
    directly, and such a waiter does not read the link: the future wants the reader then."""

    __slots__ = ("future",)

    def __init__(self, future: "TaskFuture") -> None:
        super().__init__()
        self.future = weakref.ref(future)  # no cycle: a dropped future frees its result at once

    def append(self, waiter: Any) -> None:
        super().append(waiter)
        fut = self.future()
        if fut is not None:
            fut._want()


class TaskFuture(LazyFuture):
    """The Future of a task: a thread waiting on result() or exception() reads its worker's link
    itself while nobody else does (Connection.read_for), so the answer resolves it with no
    hand-off from the rpc reader thread (a thread wake-up, tens of µs, on every round trip).
    Its call is sent quiet (the reader thread is not called for it) until something waits for
    it without reading: done() or running() while pending, a callback, a waiter of wait() or
    as_completed(), result() while another thread reads."""

    _conn: Any = None  # the connection its task was sent over
    # The rpc call carrying it, set once sent and cleared once answered (it holds the result:
    # once the caller drops that, its shared memory goes back).
    _rpc: Optional[CallFuture] = None
    _cid = 0  # that call's id
    _wanted = False  # something waits for it without reading (see _want)

    def _make_waiters(self) -> List[Any]:
        return _Waiters(self)

    def _want(self) -> None:
        """Have the reader thread read for it (Connection.want). Executor._send checks _wanted
        after setting _cid, this sets _wanted before reading _cid: one of them sees the other."""
        if not self._wanted:
            self._wanted = True
            cid = self._cid
            if cid and cid in self._conn.calls.quiet:  # most calls are not quiet: no lock round then
                self._conn.want(cid)

    _settled = LazyFuture.done  # done() for the executor's own checks: not a wait (see _want)

    def done(self) -> bool:
        if self._state in DONE:
            return True
        self._want()
        return False

    def running(self) -> bool:
        if super().running():
            self._want()
            return True
        return False

    def add_done_callback(self, fn: Callable[["cf.Future[Any]"], object]) -> None:
        self._want()
        super().add_done_callback(fn)

    def _read(self, timeout: Optional[float]) -> Optional[float]:
        conn, rpc = self._conn, self._rpc
        if rpc is None or rpc.done() or self._state in DONE:
            if self._state not in DONE:
                self._want()  # not sent yet (or answered, its callback not run yet)
            return timeout
        t0 = time.monotonic()
        # Read while the rpc call is pending, not merely while this future is: its answer may be
        # read (by the reader thread) before the executor's callback is attached, which then
        # settles this future from another thread, with no message left to wake a reader.
        conn.read_for(rpc, timeout, also=self._settled)
        if self._state not in DONE:
            self._want()  # another thread reads (or the time ran out): the reader must take over
        return None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))

    def result(self, timeout: Optional[float] = None) -> Any:
        return super().result(self._read(timeout))

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        return super().exception(self._read(timeout))


class Task:
    """One submit() call, or one chunk of map()."""

    __slots__ = ("method", "fn", "args", "kwargs", "future", "timeout", "retries", "deadline", "worker", "started", "stop", "timed_out", "sent_at")

    def __init__(self, method: str, fn: Callable[..., Any], args: Any, kwargs: Optional[Dict[str, Any]], timeout: Optional[float], retries: int) -> None:
        self.method, self.fn, self.args, self.kwargs = method, fn, args, kwargs
        self.future: TaskFuture = TaskFuture()
        self.timeout = timeout
        self.retries = retries
        self.deadline = math.inf  # set when sent (a timeout counts from the start of the task)
        self.worker: Optional[Worker] = None
        self.started = False  # set_running_or_notify_cancel() was called
        self.stop = False  # Executor.stop(): kill the worker once this task runs
        self.timed_out = False
        self.sent_at = 0.0

    def rpc_args(self) -> Tuple[Any, ...]:
        if self.method == "run":
            return self.fn, self.args, self.kwargs
        return self.fn, self.args

    def batch_entry(self) -> Tuple[Any, ...]:
        """(fn, args, kwargs) of this task in a run_batch call."""
        if self.method == "run":
            return self.fn, self.args, self.kwargs
        from ._worker import run_chunk

        return run_chunk, (self.fn, self.args), None


class Worker:
    """A worker process, its rpc client and the tasks sent to it (in order)."""

    def __init__(self, wid: int, handle: "GuestHandle | RemoteGuest", client: Client, fd_sock: "Optional[socket.socket]", codec: TaskCodec) -> None:
        self.wid = wid
        self.handle = handle
        self.client = client
        self.fd_sock = fd_sock  # None for a remote worker: no fd passing, shared arrays go by value
        self.remote = fd_sock is None  # joined over TCP (shmhub worker URL): not started, not replaced here
        self.codec = codec
        self.tasks: Deque[Task] = deque()
        self.send_lock = threading.Lock()  # tasks are appended in the order they are sent
        self.sent = 0  # tasks ever sent (max_tasks_per_child)
        self.completed = 0
        self.failed = 0
        self.reserved = 0  # picked for a task not yet appended to tasks
        self.inited: Optional[bool] = None  # the init call's outcome
        self.lost = False  # settled by the manager
        self.gone = False  # a send found its link dead: not picked any more
        self.service: Optional[float] = None  # seconds per task, a moving average of its answers
        self.last_answer = 0.0

    @property
    def pid(self) -> Optional[int]:
        return self.handle.pid

    def retire(self) -> None:
        """max_tasks_per_child reached and nothing in flight: the worker closes its link and exits
        (the host recovers its peer entry for the next worker)."""
        try:
            self.client.submit("retire")
        except Exception:
            pass  # gone already
        self.close()

    def close(self) -> None:
        """Close our end (the host's goodbye, at shutdown, ends the worker)."""
        self.client.close()
        if self.fd_sock is not None:
            self.fd_sock.close()

    def answered(self, task: Task, now: float) -> None:
        """Count a task's service time: from when it could start (sent, or the previous answer) to its answer."""
        sample = now - max(task.sent_at, self.last_answer)
        self.last_answer = now
        self.service = sample if self.service is None else 0.8 * self.service + 0.2 * sample


def exit_reason(code: Optional[int]) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


class Manager:
    """The executor's thread: starts workers, settles lost workers' tasks, enforces deadlines,
    sends pending work when a worker has room. Holds the executor by weak reference."""

    def __init__(self, executor: "Executor") -> None:
        self.cond = executor._cond
        self.host = executor._host
        self.workers = executor._workers  # the same dict: closed here if the executor is dropped
        self._ref = weakref.ref(executor, lambda _: self.wake())
        self.lost: List[Worker] = []
        self.thread = threading.Thread(target=self.run, name="shmhub-executor-manager", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def run(self) -> None:
        try:
            while True:
                try:
                    if not self.step():
                        return
                except Exception:  # a bug: say so, and keep the executor alive
                    log.exception("shmhub.Executor: the manager's step failed")
        finally:
            if self._ref() is None:  # the executor was dropped without shutdown()
                for w in list(self.workers.values()):
                    w.close()
                self.host.close()

    def step(self) -> bool:
        """Sleep until there is something to do, do it; False when the executor is finished."""
        ex = self._ref()
        if ex is None:
            return False
        with self.cond:
            while not self._has_work(ex):
                timeout = ex._next_deadline() - time.monotonic()
                del ex
                self.cond.wait(None if timeout == math.inf else max(0.0, timeout))
                ex = self._ref()
                if ex is None:
                    return False
            lost, self.lost = self.lost, []
        for w in lost:
            ex._settle_lost(w)
        ex._enforce_deadlines()
        ex._replenish()
        ex._pump()
        if ex._finished():
            ex._close_workers()
            return False
        return True

    def _has_work(self, ex: "Executor") -> bool:
        return bool(self.lost) or ex._deadline_due() or ex._needs_manager()

    def worker_lost(self, w: Worker) -> None:
        with self.cond:
            if not w.lost and w not in self.lost:
                self.lost.append(w)
                self.cond.notify()


def make_worker(ex: "Executor", wid: int) -> Worker:
    """Start a worker process and send it its init call (answered before any task it gets)."""
    from . import _worker

    ours, theirs = fd_socketpair()
    try:
        handle = ex._host.start_process(_worker.main, (ex._initializer, ex._initargs, theirs, ex._preload), context=ex._context, name=f"shmhub-worker-{wid}")
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    codec = TaskCodec()
    client = Client(handle.link, codec=codec, max_in_flight=ex._depth + 2)
    w = Worker(wid, handle, client, ours, codec)

    regions = ex._regions  # not ex: the rpc reader thread holds the codec, and must not keep ex alive

    def send_fd(rid: int) -> None:
        send_attach(ours, rid, regions.fd_of(rid))

    codec.send_fd = send_fd
    _send_init(ex, w)
    return w


def _send_init(ex: "Executor", w: Worker, *args: Any) -> None:
    """The worker's init call, answered before any task it gets (the executor held weakly)."""
    ref = weakref.ref(ex)

    def initialized(f: "cf.Future[Any]") -> None:
        e = ref()
        if e is not None:
            e._initialized(w, f)

    w.client.submit("init", *args).add_done_callback(initialized)


class RemoteTaskCodec(TaskCodec):
    """A remote worker's codec: no fd passing across machines, so shared arrays go by value (as
    out-of-band frames), like any other array."""

    def pickler_class(self) -> "Optional[type[pickle.Pickler]]":
        return None


def make_remote_worker(ex: "Executor", wid: int, guest: "RemoteGuest") -> Worker:
    """A worker that joined over TCP (`shmhub worker URL`): its init call carries the initializer."""
    codec = RemoteTaskCodec()
    client = Client(guest.link, codec=codec, max_in_flight=ex._depth + 2)
    w = Worker(wid, guest, client, None, codec)
    _send_init(ex, w, ex._initializer, ex._initargs)
    return w
