"""shmhub.Executor: a concurrent.futures process pool whose workers are guests of one Host.

The contract is ProcessPoolExecutor's (constructor arguments, submit, map, shutdown, Futures);
what differs is failure: a dead worker fails only the task it was running (WorkerCrashed), a task
can be stopped (a deadline, or stop()), and arrays travel through shared memory."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

from ..errors import ExecutorBroken, PeerTableFull, RpcProtocolError, ShmTimeout, TaskStopped, TaskTimeout, WorkerCrashed
from ..host import Host, HostEvent
from ..layout import SegmentConfig
from ..rpc._conn import CallFuture, PendingCall
from ..rpc._protocol import decode_error
from ..rpc._server import STREAM_WINDOW
from ._pool import _GONE, EXIT_WAIT, Manager, Task, Worker, exit_reason, make_remote_worker, make_worker, settle, wait_settled
from ._shared import Regions, send_drop
from ._template import start_template

if TYPE_CHECKING:
    from ..remote import RemoteGuest

__all__ = ["Executor", "TaskOptions"]

log = logging.getLogger("shmhub.executor")

DEFAULT_DEPTH = 2  # tasks sent to a worker ahead of its answers: one running, one ready to run
# Quick tasks are queued deeper, several to a run_batch call: as many as the worker runs in
# BATCH_BUDGET (its measured time per task), so a task waits at most about that long behind
# others on a busy worker while another could take it. A batch stays under STREAM_WINDOW tasks:
# the worker answers each as an ITEM without waiting for credit (its reader thread runs them, so
# it could not read one), and the caller sends none (submit_stream grants a whole window at a time).
BATCH_BUDGET = 0.001
MAX_BATCH = STREAM_WINDOW // 2
MAX_QUEUE = 4 * MAX_BATCH
AUTO_CHUNKS_PER_WORKER = 8
MAX_STARTUP_FAILURES = 3  # consecutive workers lost before answering init: the executor is broken
_WORKER_MODULE = "shmhub.executor._worker"
_TEMPLATE_MODULE = "shmhub.executor._template"


def _context(mp_context: Any) -> multiprocessing.context.BaseContext:
    if mp_context is None:
        methods = multiprocessing.get_all_start_methods()
        mp_context = "forkserver" if "forkserver" in methods else "spawn"
    ctx = multiprocessing.get_context(mp_context) if isinstance(mp_context, str) else mp_context
    method = ctx.get_start_method()
    if method not in ("spawn", "forkserver"):
        raise ValueError(
            f"shmhub.Executor does not support the {method!r} start method: a forked worker "
            "inherits the parent's threads' locks and its other workers' fds; use 'spawn' or "
            "'forkserver' (the default)"
        )
    return ctx


class Executor(cf.Executor):
    """A process pool on the hub. Accepts ProcessPoolExecutor's arguments; fork is refused.

    preload: modules imported once in the forkserver's template process, so new and replacement
    workers start without importing them again (forkserver context only). config: the Host's
    SegmentConfig (ring and pool sizes).

    listen: "tcp://HOST:PORT" where remote workers (`shmhub worker URL`, on any machine) join the
    pool beside the max_workers local ones; listen_options go to shmhub.remote.Listener (CURVE
    keys, liveness). Remote workers are not started or replaced here (docs/remote.md)."""

    def __init__(
        self,
        max_workers: Optional[int] = None,
        mp_context: Any = None,
        initializer: Optional[Callable[..., Any]] = None,
        initargs: Tuple[Any, ...] = (),
        *,
        max_tasks_per_child: Optional[int] = None,
        preload: Sequence[str] = (),
        config: Optional[SegmentConfig] = None,
        queue_depth: int = DEFAULT_DEPTH,
        listen: Optional[str] = None,
        listen_options: Optional[Dict[str, Any]] = None,
    ) -> None:
        if max_workers is None:
            max_workers = os.cpu_count() or 1
        if max_workers < 1:
            raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None and max_tasks_per_child < 1:
            raise ValueError("max_tasks_per_child must be >= 1")
        if queue_depth < 1:
            raise ValueError("queue_depth must be >= 1")
        self._context = _context(mp_context)
        self._preload = tuple(preload)
        if self._context.get_start_method() == "forkserver":
            self._context.set_forkserver_preload([_TEMPLATE_MODULE, _WORKER_MODULE, *self._preload])
            start_template()
        self._max_workers = max_workers
        self._initializer, self._initargs = initializer, tuple(initargs)
        self._max_tasks = max_tasks_per_child
        self._depth = queue_depth
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._pending: Deque[Task] = deque()
        self._workers: Dict[int, Worker] = {}
        self._by_peer: Dict[int, Worker] = {}
        self._ids = itertools.count(1)
        self._shutdown = False
        self._broken: Optional[BaseException] = None
        self._startup_failures = 0
        self._peers_full = False  # the host's peer table had no entry for a new worker
        self._counts = {"submitted": 0, "completed": 0, "failed": 0, "crashed": 0, "timed_out": 0, "stopped": 0, "retried": 0, "restarts": 0, "batched": 0}
        self._regions = Regions()
        self._regions.on_drop = weakref.WeakMethod(self._drop_region)
        if config is None:
            config = SegmentConfig(max_guests=min(255, max(8, 2 * max_workers + 2)))
        self._host = Host(config, on_event=_weak_event(weakref.ref(self)))
        self._manager = Manager(self)
        try:
            with self._lock:
                for _ in range(max_workers):
                    self._start_worker()
        except BaseException:
            self._host.close()
            raise
        self._manager.start()
        self._remote: Any = None
        if listen is not None:
            try:
                self._remote = self._host.listen(listen, on_guest=_weak_joined(weakref.ref(self)), **(listen_options or {}))
            except BaseException:
                self.shutdown(wait=True, cancel_futures=True)
                raise

    @property
    def address(self) -> Optional[str]:
        """The tcp:// endpoint remote workers join at (listen=...), or None."""
        return self._remote.endpoint if self._remote is not None else None

    # -- the public API ---------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> "cf.Future[Any]":
        """Schedule fn(*args, **kwargs); a concurrent.futures.Future of its result."""
        return self._submit(Task("run", fn, args, kwargs, None, 0))

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: Optional[float] = None, chunksize: int = 1, progress: bool = False
    ) -> Iterator[Any]:
        """Results of fn over the iterables, in order. chunksize=1 on a long input is raised
        automatically (AUTO_CHUNKS_PER_WORKER chunks per worker); progress=True shows a tqdm bar."""
        return self._map(fn, iterables, timeout, chunksize, progress, None, 0)

    def options(self, timeout: Optional[float] = None, retries: int = 0) -> "TaskOptions":
        """The same submit/map with a deadline per task (a task still running `timeout` seconds
        after it started is stopped: its worker is killed and replaced, its future raises
        TaskTimeout) and `retries` resubmissions of a task whose worker crashed (for idempotent
        work)."""
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be > 0 or None")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        return TaskOptions(self, timeout, retries)

    def stop(self, future: "cf.Future[Any]") -> bool:
        """Stop one task: a pending one is cancelled; a running one is stopped by killing its
        worker (replaced at once; the future raises TaskStopped); one sent to a worker but not yet
        running is stopped as soon as it starts. False if the task had already finished."""
        with self._lock:
            for w in self._workers.values():
                for i, task in enumerate(w.tasks):
                    if task.future is future:
                        task.stop = True
                        if i == 0:
                            w.handle.kill()
                        return True
            queued = next((t for t in self._pending if t.future is future), None)
            if queued is not None:
                self._pending.remove(queued)
        if queued is not None and not future.cancel():  # requeued after its worker died: RUNNING
            settle(future, exc=TaskStopped("stopped before it started"))
            return True
        return queued is not None or future.cancel()

    def empty(self, shape: Any, dtype: Any = "float64") -> Any:
        """A numpy array in shared memory: passed to (or returned by) a task, it travels by
        reference, with no copy, to any worker. Its memory is freed when the array and every
        view of it are gone."""
        return self._regions.empty(shape, dtype)

    def zeros(self, shape: Any, dtype: Any = "float64") -> Any:
        """empty(), filled with zeros (fresh shared memory reads as zeros: no page is touched)."""
        return self._regions.empty(shape, dtype)

    def stats(self) -> Dict[str, Any]:
        """Counters (submitted, completed, failed, crashed, timed_out, stopped, retried, restarts,
        batched: tasks sent several to a call), pending tasks, and per worker: id, pid, tasks
        completed and failed, tasks in flight."""
        with self._lock:
            out: Dict[str, Any] = dict(self._counts)
            out["pending"] = len(self._pending)
            out["workers"] = [
                {"id": w.wid, "pid": w.pid, "completed": w.completed, "failed": w.failed, "in_flight": len(w.tasks), "remote": w.remote}
                for w in self._workers.values()
            ]
            return out

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No more tasks; with cancel_futures, pending tasks are cancelled; wait: until every
        task has finished and the workers have exited."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                while self._pending:
                    task = self._pending.popleft()
                    if not task.future.cancel():  # requeued after a lost worker: already RUNNING
                        settle(task.future, exc=cf.CancelledError())
            self._cond.notify_all()
            workers = list(self._workers.values())
        for w in workers:  # the manager waits for every answer
            w.client._conn.want_all()
        if wait and self._manager.thread.is_alive() and threading.current_thread() is not self._manager.thread:
            self._manager.thread.join()

    # -- submitting -------------------------------------------------------------------------

    def _submit(self, task: Task) -> "cf.Future[Any]":
        if self._pending:  # one of many (read unlocked: a hint): its Condition now, outside the lock
            task.future.make_condition()
        with self._lock:
            if self._broken is not None:
                raise ExecutorBroken(str(self._broken))
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._counts["submitted"] += 1
            if self._pending:
                # Behind other pending tasks: a worker with room again wakes the manager, which
                # sends them in order.
                self._pending.append(task)
                return task.future
            w = self._pick(task)
            if w is None:
                self._pending.append(task)
                busy = list(self._workers.values())
            else:
                self._reserve(w, 1)
        # From the caller's thread: the lowest latency when a worker has room.
        if w is None:
            self._want_answers(busy)
        else:
            self._send(w, task)
        return task.future

    def _map(
        self,
        fn: Callable[..., Any],
        iterables: Sequence[Iterable[Any]],
        timeout: Optional[float],
        chunksize: int,
        progress: bool,
        task_timeout: Optional[float],
        retries: int,
    ) -> Iterator[Any]:
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        end = None if timeout is None else time.monotonic() + timeout
        items = list(zip(*iterables))
        n = len(items)
        if chunksize == 1 and n > 4 * self._max_workers:
            chunksize = math.ceil(n / (AUTO_CHUNKS_PER_WORKER * self._max_workers))
        if chunksize == 1:
            futures = [self._submit(Task("run", fn, args, None, task_timeout, retries)) for args in items]
        else:
            futures = [self._submit(Task("run_chunk", fn, items[i : i + chunksize], None, task_timeout, retries)) for i in range(0, n, chunksize)]
        del items
        bar = _progress(n) if progress else None
        return _results(futures, end, chunksize > 1, bar)

    # -- dispatch (any thread) --------------------------------------------------------------

    def _limit(self, w: Worker) -> int:
        """Tasks a worker may hold: the queue depth, deeper for quick tasks (BATCH_BUDGET)."""
        if w.service is None:
            return self._depth
        return max(self._depth, min(MAX_QUEUE, int(BATCH_BUDGET / max(w.service, 1e-6))))

    def _room(self, w: Worker, task: Task) -> bool:
        tasks = w.tasks
        # A worker running a task with a deadline takes nothing more: a kill must hit that task alone.
        if w.lost or w.gone or (tasks and tasks[0].timeout is not None):
            return False
        if self._max_tasks is not None and w.sent >= self._max_tasks:
            return False
        load = len(tasks) + w.reserved
        if task.timeout is not None:
            return load == 0
        # Below the depth, or down to half a deep queue: refilled by batches, not task by task.
        return load < self._depth or load <= self._limit(w) // 2

    def _pick(self, task: Task) -> Optional[Worker]:
        best: Optional[Worker] = None
        for w in self._workers.values():
            # The least loaded; on a tie a local worker (a remote link is slower).
            if self._room(w, task) and (best is None or (len(w.tasks) + w.reserved, w.remote) < (len(best.tasks) + best.reserved, best.remote)):
                best = w
        return best

    def _pump(self) -> None:
        """Send pending tasks to workers with room, oldest first; quick ones several to a call."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                w = self._pick(self._pending[0])
                if w is None:
                    busy = list(self._workers.values())
                    break
                n = min(self._limit(w) - len(w.tasks) - w.reserved, MAX_BATCH)
                if self._max_tasks is not None:
                    n = min(n, self._max_tasks - w.sent)
                batch = [self._pending.popleft()]
                if batch[0].timeout is None:  # one with a deadline runs alone (a kill must hit it alone)
                    while len(batch) < n and self._pending and self._pending[0].timeout is None:
                        batch.append(self._pending.popleft())
                self._reserve(w, len(batch))
            if len(batch) == 1:
                self._send(w, batch[0])
            else:
                self._send_batch(w, batch)
        self._want_answers(busy)

    def _reserve(self, w: Worker, n: int) -> None:
        """Under the lock: n tasks picked for w, to be sent."""
        w.reserved += n
        w.sent += n
        if self._max_tasks is not None and w.sent >= self._max_tasks:
            self._cond.notify_all()  # its replacement starts now, ahead of its retirement

    @staticmethod
    def _want_answers(workers: List[Worker]) -> None:
        """Tasks wait for room, which answers make: have them read (Connection.want_all)."""
        for w in workers:
            w.client._conn.want_all()

    def _take(self, w: Worker, tasks: List[Task]) -> List[Task]:
        """Under the lock: tasks reserved for w become its tasks (those not cancelled meanwhile);
        none if w was lost meanwhile (they go back, first in line)."""
        w.reserved -= len(tasks)
        if w.lost:
            self._pending.extendleft(reversed(tasks))
            self._cond.notify_all()
            return []
        live = []
        now = time.monotonic()
        for task in tasks:
            if not task.started:
                if not task.future.set_running_or_notify_cancel():
                    continue  # cancelled while pending
                task.started = True
            task.worker = w
            task.future._conn = w.client._conn
            task.sent_at = now
            if task.timeout is not None:
                task.deadline = now + task.timeout
                self._cond.notify_all()
            live.append(task)
        w.tasks.extend(live)
        return live

    def _quiet(self, w: Worker, task: Task) -> bool:
        """Under the lock: whether the call carrying a lone task may leave the reading to whoever
        waits for it (Connection.want): not while tasks wait for room (answers make room), nor
        for a task with a deadline or the last task of a worker that retires (the manager waits
        for their answers), nor for a future something already waits for. (A batch, sent under
        load, is never quiet: many answers would go unread.)"""
        return not (self._pending or task.timeout is not None or task.future._wanted or (self._max_tasks is not None and w.sent >= self._max_tasks))

    @staticmethod
    def _sent(tasks: List[Task], call: PendingCall) -> None:
        for t in tasks:
            t.future._rpc, t.future._cid = cast(CallFuture, call.future), call.cid
            if t.future._wanted:  # wanted meanwhile (see TaskFuture._want)
                call.conn.want(call.cid)

    def _send(self, w: Worker, task: Task) -> None:
        with w.send_lock:
            with self._lock:
                if not self._take(w, [task]):
                    return
                quiet = self._quiet(w, task)
            try:
                call = w.client._start(task.method, task.rpc_args(), quiet=quiet)
                f = cast(CallFuture, call.future)
                if f.done() and isinstance(f.exception(), _GONE):
                    # rpc settles a call whose send failed instead of raising: the worker never got
                    # this task (it cannot also have run it, died and been noticed in between)
                    raise f.exception()  # type: ignore[misc]
                self._sent([task], call)
            except BaseException as e:
                if self._unsent(w, [task], e):
                    return
                with self._lock:
                    self._counts["failed"] += 1
                settle(task.future, exc=e)  # e.g. the arguments do not pickle: this task alone fails
                if not isinstance(e, Exception):
                    raise
                return
        f.add_done_callback(lambda f: self._answered(w, task, f))

    def _send_batch(self, w: Worker, tasks: List[Task]) -> None:
        """Several tasks in one run_batch call, answered one ITEM per task, in order."""
        with w.send_lock:
            with self._lock:
                live = self._take(w, tasks)
            if not live:
                return
            answers = iter(live)
            try:
                call = w.client._start("run_batch", ([t.batch_entry() for t in live],), on_item=lambda item: self._item(w, next(answers), item))
                f = cast(CallFuture, call.future)
                if f.done() and isinstance(f.exception(), _GONE):
                    raise f.exception()  # type: ignore[misc]
            except BaseException as e:
                if self._unsent(w, live, e):
                    return
                if not isinstance(e, Exception):  # interrupted: as _send does, the tasks fail with it
                    for t in live:
                        settle(t.future, exc=e)
                    raise
                f = None  # e.g. one task's arguments do not pickle: one by one below, so it alone fails
            else:
                self._sent(live, call)
                with self._lock:
                    self._counts["batched"] += len(live)
        if f is None:
            for t in live:
                with self._lock:
                    w.reserved += 1
                self._send(w, t)
            return
        f.add_done_callback(lambda f: self._batch_done(w, live, f))

    def _unsent(self, w: Worker, tasks: List[Task], e: BaseException) -> bool:
        """Tasks whose call was not sent are w's no more. True if w's link is gone: they go back
        first in line and the manager settles w."""
        gone = isinstance(e, _GONE)
        with self._lock:
            for t in tasks:
                w.tasks.remove(t)
            if gone:
                w.gone = True  # no more tasks for it: the manager settles it soon
                self._pending.extendleft(reversed(tasks))
            self._cond.notify_all()
        if gone:
            self._manager.worker_lost(w)
        return gone

    def _answered(self, w: Worker, task: Task, f: CallFuture) -> None:
        """A worker's answer to a lone task (rpc reader thread)."""
        exc = f.exception()
        if isinstance(exc, _GONE):
            w.gone = True
            self._manager.worker_lost(w)  # the task's fate is decided with the worker's other tasks
            return
        task.future._rpc = None
        self._done(w, task, exc, None if exc is not None else f.result())

    def _item(self, w: Worker, task: Task, item: Any) -> None:
        """One task's answer in a run_batch stream (rpc reader thread)."""
        task.future._rpc = None
        ok, value = item
        if ok:
            self._done(w, task, None, value)
        else:
            self._done(w, task, decode_error(value, w.codec), None)

    def _batch_done(self, w: Worker, tasks: List[Task], f: CallFuture) -> None:
        """A run_batch call ended: every task was answered, or the call failed as a whole."""
        exc = f.exception()
        if isinstance(exc, _GONE):
            w.gone = True
            self._manager.worker_lost(w)
            return
        with self._lock:
            left = [t for t in tasks if t in w.tasks]
        for t in left:  # e.g. the worker's initializer failed: the batch's tasks fail with it
            t.future._rpc = None
            self._done(w, t, exc if exc is not None else RpcProtocolError("run_batch ended without answering every task"), None)

    def _done(self, w: Worker, task: Task, exc: Optional[BaseException], value: Any) -> None:
        with self._lock:
            try:
                w.tasks.remove(task)
            except ValueError:
                return  # settled by the lost-worker path
            w.answered(task, time.monotonic())
            if exc is None:
                w.completed += 1
                self._counts["completed"] += 1
            else:
                w.failed += 1
                self._counts["failed"] += 1
            nxt = w.tasks[0] if w.tasks else None
            if (
                (self._pending and self._room(w, self._pending[0]))
                or (self._max_tasks is not None and w.sent >= self._max_tasks and not w.tasks)
                or self._shutdown
            ):
                self._cond.notify_all()
        if exc is not None:
            settle(task.future, exc=exc)
        else:
            settle(task.future, value)
        if nxt is not None and nxt.stop:
            w.handle.kill()  # stop() asked for it before it started

    # -- the manager's steps (manager thread) -----------------------------------------------

    def _needs_manager(self) -> bool:
        if self._broken is None and not self._shutdown and not self._peers_full and self._active() < self._max_workers:
            return True
        if any(self._spent(w) and not w.tasks for w in self._workers.values()):
            return True
        if self._pending and self._pick(self._pending[0]) is not None:
            return True
        return self._finished()

    def _active(self) -> int:
        """Local workers that take tasks (or will once started); remote ones come and go on their own."""
        return sum(1 for w in self._workers.values() if not w.remote and not self._spent(w))

    def _spent(self, w: Worker) -> bool:
        return self._max_tasks is not None and w.sent >= self._max_tasks

    def _finished(self) -> bool:
        if not self._shutdown or self._pending:
            return False
        return not any(w.tasks for w in self._workers.values())

    def _next_deadline(self) -> float:
        d = math.inf
        for w in self._workers.values():
            if w.tasks and not w.tasks[0].timed_out:
                d = min(d, w.tasks[0].deadline)
        return d

    def _deadline_due(self) -> bool:
        return self._next_deadline() <= time.monotonic()

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            for w in self._workers.values():
                head = w.tasks[0] if w.tasks else None
                if head is not None and not head.timed_out and head.deadline <= now:
                    head.timed_out = True
                    w.handle.kill()

    def _replenish(self) -> None:
        """Retire workers at max_tasks_per_child, start workers up to max_workers."""
        with self._lock:
            done = [w for w in self._workers.values() if self._spent(w) and not w.tasks and not w.reserved]
            for w in done:
                self._forget(w)
        for w in done:
            w.retire()
        while True:
            with self._lock:
                if self._broken is not None or self._shutdown or self._active() >= self._max_workers:
                    return
                try:
                    self._start_worker()
                except PeerTableFull:  # retired or lost workers free their entries: try again then
                    self._peers_full = True
                    return
                except Exception as e:
                    log.exception("shmhub.Executor: starting a worker failed")
                    self._break(ExecutorBroken(f"starting a worker failed: {e!r}"))
                    self._fail_pending()
                    return

    def _start_worker(self) -> None:
        w = make_worker(self, next(self._ids))
        self._workers[w.wid] = w
        if w.handle.peer_id is not None:
            self._by_peer[w.handle.peer_id] = w

    def _forget(self, w: Worker) -> None:
        self._workers.pop(w.wid, None)
        peer = w.handle.peer_id  # None for a remote worker
        if peer is not None and self._by_peer.get(peer) is w:
            del self._by_peer[peer]

    def _settle_lost(self, w: Worker) -> None:
        """A worker died (or its link broke): its first task failed with it, the others never
        started and go back to the queue; the worker is replaced by _replenish."""
        with w.send_lock:
            with self._lock:
                if w.lost:
                    return
                w.lost = True
                self._forget(w)
        # The reader (it reads while calls are pending) first settles what the worker answered
        # before it died; calls it answered are gone from w.tasks then.
        w.client._conn.want_all()
        wait_settled([f for t in list(w.tasks) if (f := t.future._rpc) is not None], EXIT_WAIT)
        w.handle.kill()  # a broken link but a live process: it must not run on
        try:
            code: Optional[int] = w.handle.wait(EXIT_WAIT)
        except ShmTimeout:
            code = None
        if w.remote:
            reason = f"lost its connection ({cast('RemoteGuest', w.handle).link.gone_reason or 'closed'})"
        else:
            reason = exit_reason(code)
        with self._lock:
            tasks = list(w.tasks)
            w.tasks.clear()
            for t in tasks:
                t.future._rpc = None
            first: Optional[Task] = tasks[0] if tasks else None
            requeue = tasks[1:]
            exc: Optional[BaseException] = None
            if w.inited is None and not w.remote:  # a remote worker that drops out says nothing of ours
                self._startup_failures += 1
                if self._startup_failures >= MAX_STARTUP_FAILURES and not self._shutdown:
                    self._break(ExecutorBroken(f"{self._startup_failures} workers in a row were lost before they started (the last {reason})"))
            if first is not None:
                what = f"worker {w.wid} (pid {w.pid}) {reason}"
                if first.timed_out:
                    exc = TaskTimeout(f"task still running after its timeout of {first.timeout} s: {what}")
                    self._counts["timed_out"] += 1
                elif first.stop:
                    exc = TaskStopped(f"stopped: {what}")
                    self._counts["stopped"] += 1
                elif first.retries > 0:
                    first.retries -= 1
                    requeue.insert(0, first)
                    self._counts["retried"] += 1
                else:
                    exc = WorkerCrashed(f"{what} while running this task")
                    self._counts["crashed"] += 1
                if exc is not None:
                    w.failed += 1
            stopped = [t for t in requeue if t.stop]  # stop() before they started: they never will
            for t in reversed(requeue):
                if not t.stop:
                    self._pending.appendleft(t)
            if self._broken is not None:
                self._fail_pending()
            if not self._shutdown:
                self._counts["restarts"] += 1
            self._cond.notify_all()
        if first is not None and exc is not None:
            settle(first.future, exc=exc)
        for t in stopped:
            settle(t.future, exc=TaskStopped("stopped before it started"))
        w.close()

    def _initialized(self, w: Worker, f: "cf.Future[Any]") -> None:
        """The answer to a worker's init call (rpc reader thread)."""
        exc = f.exception()
        if isinstance(exc, _GONE):
            return  # lost before it started: _settle_lost counts it
        with self._lock:
            w.inited = exc is None
            if exc is None:
                self._startup_failures = 0
                return
            self._break(ExecutorBroken(f"a worker's initializer failed: {exc!r}"))
            self._fail_pending()
            self._cond.notify_all()

    def _break(self, err: BaseException) -> None:
        if self._broken is None:
            self._broken = err
            log.error("shmhub.Executor is broken: %s", err)

    def _fail_pending(self) -> None:
        while self._pending:
            task = self._pending.popleft()
            settle(task.future, exc=ExecutorBroken(str(self._broken)))

    def _close_workers(self) -> None:
        """The end: every worker says goodbye, the host closes (killing any that linger)."""
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
        for w in workers:
            w.close()
        self._regions.close()
        self._host.close()

    # -- events from the host (its monitor thread) ------------------------------------------

    def _on_host_event(self, ev: HostEvent) -> None:
        if ev.kind in ("died", "exited", "recovery_failed"):
            w = self._by_peer.get(ev.peer_id)
            if w is not None and w.handle.pid == ev.pid:
                self._manager.worker_lost(w)
            with self._cond:  # its peer entry is free again (a retired worker's too)
                if self._peers_full:
                    self._peers_full = False
                    self._cond.notify_all()

    # -- remote workers (the listener's thread) ----------------------------------------------

    def _remote_joined(self, guest: "RemoteGuest") -> None:
        with self._lock:
            refused = self._broken is not None or self._shutdown
            wid = next(self._ids)
        if refused:
            guest.kill()
            return
        # Its init call waits for the guest's connection (no lock held): tasks come after it.
        w = make_remote_worker(self, wid, guest)
        with self._lock:
            if self._broken is not None or self._shutdown:
                refused = True
            else:
                self._workers[w.wid] = w
                self._cond.notify_all()
        if refused:
            w.close()
            return
        self._pump()

    def _drop_region(self, rid: int) -> None:
        with self._lock:
            workers = list(self._workers.values())
        for w in workers:
            if w.fd_sock is not None and rid in w.codec.sent:
                send_drop(w.fd_sock, rid)

    def __repr__(self) -> str:
        return f"<shmhub.Executor workers={len(self._workers)} pending={len(self._pending)}>"


def _weak_event(ref: "weakref.ref[Executor]") -> Callable[[HostEvent], None]:
    """The host's event callback, holding the executor weakly (the host outlives it in the manager)."""

    def on_event(ev: HostEvent) -> None:
        ex = ref()
        if ex is not None:
            ex._on_host_event(ev)

    return on_event


def _weak_joined(ref: "weakref.ref[Executor]") -> Callable[["RemoteGuest"], None]:
    """The listener's on_guest callback, holding the executor weakly."""

    def on_guest(guest: "RemoteGuest") -> None:
        ex = ref()
        if ex is None:
            guest.kill()
        else:
            ex._remote_joined(guest)

    return on_guest


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """Executor.options(...): submit and map with a per-task timeout and retries."""

    executor: Executor
    timeout: Optional[float]
    retries: int

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> "cf.Future[Any]":
        return self.executor._submit(Task("run", fn, args, kwargs, self.timeout, self.retries))

    def map(
        self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: Optional[float] = None, chunksize: int = 1, progress: bool = False
    ) -> Iterator[Any]:
        return self.executor._map(fn, iterables, timeout, chunksize, progress, self.timeout, self.retries)


def _progress(total: int) -> Any:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        raise ImportError("progress=True needs tqdm: pip install 'shmhub[executor]'") from None
    return tqdm(total=total)


def _results(futures: List["cf.Future[Any]"], end: Optional[float], chunked: bool, bar: Any) -> Iterator[Any]:
    """Yield results in order, as concurrent.futures' map does; what is left is cancelled when the
    consumer stops early or a result raises."""
    futures.reverse()
    try:
        while futures:
            f = futures[-1]
            value = f.result() if end is None else f.result(end - time.monotonic())
            futures.pop()
            del f
            if chunked:
                for v in value:
                    if bar is not None:
                        bar.update(1)
                    yield v
            else:
                if bar is not None:
                    bar.update(1)
                yield value
    finally:
        for f in futures:
            f.cancel()
        if bar is not None:
            bar.close()
