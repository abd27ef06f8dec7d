"""One RPC connection per link: the reader thread, frame sending, the deadline timer and the
in-flight limit, driving the sans-IO state of _protocol.

Data flow (both ends alike; either may call, serve, or both):

    caller threads / event loop          reader thread (blocks in link.recv(timeout=None))
    Client.submit -> start_call ---- REQUEST ---->  peer's reader -> Server.dispatch -> handler
                                                                  (thread pool / event loop)
    future resolved by reader  <--- RESULT/ERROR/ITEM/END ---- handler's sends
    fut.cancel / deadline      ---- CANCEL ---->   handler: cancelled() / CancelledError
    Stream consumer            ---- CREDIT ---->   streaming handler may send more items

Rules: every call resolves exactly once, settled by the future's own state (InvalidStateError is
caught, never checked beforehand); a frame and its out-of-band buffers go out under one send lock;
the reader never runs handler code nor waits for a caller; nothing polls on a timer while idle."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from .. import _crash
from ..link import Link
from ..errors import DeadlineExceeded, HostGone, LinkClosed, LinkCorrupted, PeerDead, RpcProtocolError, ShmTimeout
from ._codec import Codec, codec_for
from ._future import LazyFuture
from ._protocol import CallTable, FrameAssembler, Incoming, ServingTable, decode_error, DEFAULT_MAX_FRAME
from ._wire import FLAG_STREAM, K_CANCEL, K_CREDIT, K_END, K_ERROR, K_ITEM, K_REQUEST, Kind, encode_header

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["CallbackStream", "Connection", "WouldBlock", "connection_for", "PendingCall", "StreamState", "monotonic_deadline"]

log = logging.getLogger("shmhub.rpc")

_GONE = (PeerDead, HostGone, LinkClosed, LinkCorrupted)
QUIET_MAX = 2  # quiet calls per connection at a time (start_call)


class WouldBlock(Exception):
    """send_frame(nowait=True) would have waited (ring, slot, mapping or send lock): nothing was sent."""


def monotonic_deadline(timeout: Optional[float]) -> int:
    """A timeout in seconds as an absolute CLOCK_MONOTONIC deadline in ns (0: none)."""
    if timeout is None:
        return 0
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic_ns() + max(1, int(timeout * 1e9))


def _remaining(deadline_ns: int) -> Optional[float]:
    return None if not deadline_ns else max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9)


def settle(fut: "AnyFuture", value: Any = None, exc: Optional[BaseException] = None) -> bool:
    """Resolve a future unless something else already did (its state decides)."""
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
        return True
    except cf.InvalidStateError:
        return False


_PENDING, _FINISHED, _CANCELLED = 0, 1, 2
_FUT_LOCK = threading.Lock()  # the state changes of every CallFuture: held for a few bytecodes


class CallFuture:
    """The future of a call() or acall(): the part of concurrent.futures.Future that rpc uses, at
    a fraction of its cost (no Condition per call: a waiter parks on a lock of its own, created
    only when it has to wait). Never handed to users: submit() returns a real Future."""

    __slots__ = ("_state", "_value", "_exc", "_callbacks", "_waiters")

    def __init__(self) -> None:
        self._state = _PENDING
        self._value: Any = None
        self._exc: Optional[BaseException] = None
        self._callbacks: List[Callable[["CallFuture"], None]] = []
        self._waiters: Optional[List[Any]] = None

    def done(self) -> bool:
        return self._state != _PENDING

    def cancelled(self) -> bool:
        return self._state == _CANCELLED

    def _settle(self, state: int, value: Any, exc: Optional[BaseException]) -> bool:
        with _FUT_LOCK:
            if self._state != _PENDING:
                return False
            self._value, self._exc, self._state = value, exc, state
            waiters, self._waiters = self._waiters, None
        if waiters:
            for w in waiters:
                w.release()
        for fn in self._callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("rpc: a call's done callback failed")
        return True

    def set_result(self, value: Any) -> None:
        if not self._settle(_FINISHED, value, None):
            raise cf.InvalidStateError("the call is already settled")

    def set_exception(self, exc: BaseException) -> None:
        if not self._settle(_FINISHED, None, exc):
            raise cf.InvalidStateError("the call is already settled")

    def cancel(self) -> bool:
        if self._settle(_CANCELLED, None, None):
            return True
        return self._state == _CANCELLED

    def set_running_or_notify_cancel(self) -> bool:
        return self._state == _PENDING

    def add_done_callback(self, fn: Callable[["CallFuture"], None]) -> None:
        with _FUT_LOCK:
            if self._state == _PENDING:
                self._callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:
            log.exception("rpc: a call's done callback failed")

    def _wait(self, timeout: Optional[float]) -> None:
        if self._state != _PENDING:
            return
        w = threading.Lock()
        w.acquire()
        with _FUT_LOCK:
            if self._state != _PENDING:
                return
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(w)
        if w.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return
        with _FUT_LOCK:
            if self._waiters is not None and w in self._waiters:
                self._waiters.remove(w)
        if self._state == _PENDING:
            raise cf.TimeoutError()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        self._wait(timeout)
        if self._state == _CANCELLED:
            raise cf.CancelledError()
        return self._exc

    def result(self, timeout: Optional[float] = None) -> Any:
        self._wait(timeout)
        if self._state == _CANCELLED:
            raise cf.CancelledError()
        if self._exc is not None:
            try:
                raise self._exc
            finally:
                self = None  # type: ignore[assignment]  # no cycle through the traceback (as cf.Future)
        return self._value


AnyFuture = Union["cf.Future[Any]", CallFuture]


class StreamState:
    """Items of a streamed call, filled by the reader, drained by a sync or async consumer."""

    def __init__(self) -> None:
        self.items: Deque[Any] = deque()
        self.cond = threading.Condition(threading.Lock())
        self.waiters: List[Tuple["asyncio.AbstractEventLoop", "asyncio.Future[None]", int]] = []  # (loop, future, its thread)
        self.consumed = 0  # since the last CREDIT

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()
            waiters, self.waiters = self.waiters, []
        for loop, f, tid in waiters:
            _wake_in(loop, tid, f)

    def put(self, item: Any) -> None:
        with self.cond:
            self.items.append(item)
        self.wake()


class CallbackStream(StreamState):
    """Items of a streamed call handed to a callback in the reader thread (Client.submit_stream):
    no consumer thread. Credit is granted a window at a time, once the handler has used it up, so
    a stream of at most a window (the executor's batches) costs no CREDIT frame at all."""

    def __init__(self, on_item: Callable[[Any], None], window: int) -> None:
        super().__init__()
        self.on_item = on_item
        self.window = window
        self.call: Optional["PendingCall"] = None

    def put(self, item: Any) -> None:
        try:
            self.on_item(item)
        except Exception:  # the caller's bug: the stream and the connection go on
            log.exception("rpc: a stream's on_item callback failed")
        self.consumed += 1
        call = self.call
        if self.consumed >= self.window and call is not None and not call.future.done():
            n, self.consumed = self.consumed, 0
            try:  # from the reader thread: bounded, as a CANCEL from a done callback is
                call.conn.send_frame(K_CREDIT, call.cid, b"", (), arg=n, deadline_for_send=monotonic_deadline(1.0))
            except Exception:
                pass  # the link is gone or stuck: the call fails from the reader

    def wake(self) -> None:
        pass  # nobody waits on it


def _fail_async(f: "asyncio.Future[None]", err: BaseException) -> None:
    if not f.done():
        f.set_exception(err)


def _wake_async(f: "asyncio.Future[None]") -> None:
    if not f.done():
        f.set_result(None)


def _wake_in(loop: "asyncio.AbstractEventLoop", tid: int, f: "asyncio.Future[None]") -> None:
    """Resolve f of the loop running in thread tid: directly from that thread (no self-pipe
    write), else through call_soon_threadsafe."""
    if threading.get_ident() == tid:
        _wake_async(f)
        return
    try:
        loop.call_soon_threadsafe(_wake_async, f)
    except RuntimeError:  # that loop is closed: nobody awaits
        pass


class PendingCall:
    """A call this end issued."""

    __slots__ = ("cid", "future", "stream", "deadline_ns", "conn")

    def __init__(self, conn: "Connection", future: "AnyFuture", deadline_ns: int, stream: Optional[StreamState]) -> None:
        self.cid = 0
        self.conn = conn
        self.future = future
        self.deadline_ns = deadline_ns
        self.stream = stream


class _Limiter:
    """At most n calls in flight: sync callers block, async callers await; both give up at their
    deadline or when the connection ends. A free permit costs one plain lock round (no
    Condition methods: they are Python code, and this runs twice per call)."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.free = n
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.sync_waiters = 0
        self.async_waiters: Deque[Tuple["asyncio.AbstractEventLoop", "asyncio.Future[None]"]] = deque()
        self.error: Optional[BaseException] = None

    def acquire(self, deadline_ns: int) -> None:
        with self.lock:
            if self.free > 0 and self.error is None:
                self.free -= 1
                return
            self.sync_waiters += 1
            try:
                while True:
                    if self.error is not None:
                        raise self.error
                    if self.free > 0:
                        self.free -= 1
                        return
                    rem = _remaining(deadline_ns)
                    if rem is not None and rem <= 0:
                        raise DeadlineExceeded("deadline passed while waiting for a free in-flight call slot")
                    self.cond.wait(rem)
            finally:
                self.sync_waiters -= 1

    async def aacquire(self, deadline_ns: int) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            if self.free > 0:
                self.free -= 1
                return
            # Looked up only here: each lookup is a getpid() syscall in Python 3.11.
            loop = asyncio.get_running_loop()
            f: asyncio.Future[None] = loop.create_future()
            self.async_waiters.append((loop, f))
        try:
            await asyncio.wait_for(f, _remaining(deadline_ns))
        except asyncio.TimeoutError:
            self._abandon(loop, f)
            raise DeadlineExceeded("deadline passed while waiting for a free in-flight call slot") from None
        except BaseException:
            self._abandon(loop, f)
            raise

    def _abandon(self, loop: "asyncio.AbstractEventLoop", f: "asyncio.Future[None]") -> None:
        """An async waiter gave up: if a permit was handed to it meanwhile, give it back."""
        with self.lock:
            try:
                self.async_waiters.remove((loop, f))
                return
            except ValueError:
                pass  # already handed a permit (or failed by close)
        if f.done() and not f.cancelled() and f.exception() is None:
            self.release()

    def release(self) -> None:
        with self.lock:
            if self.async_waiters:
                loop, f = self.async_waiters.popleft()
                try:
                    loop.call_soon_threadsafe(self._hand, f)
                    return
                except RuntimeError:  # its loop is closed: the permit stays here
                    pass
            self.free += 1
            if self.sync_waiters:
                self.cond.notify()

    def _hand(self, f: "asyncio.Future[None]") -> None:
        if f.done():  # cancelled meanwhile: the permit is not used
            self.release()
        else:
            f.set_result(None)

    def fail(self, err: BaseException) -> None:
        with self.lock:
            self.error = err
            self.cond.notify_all()
            waiters, self.async_waiters = list(self.async_waiters), deque()
        for loop, f in waiters:
            try:
                loop.call_soon_threadsafe(_fail_async, f, err)
            except RuntimeError:
                pass


class Connection:
    """The RPC state of one link: its reader thread, both call tables and the send lock."""

    def __init__(self, link: Any, codec: Codec, max_in_flight: int, max_frame: int) -> None:
        self.link = link
        self.codec = codec
        self.max_frame = max_frame
        self.lock = threading.Lock()  # the tables
        self.send_lock = threading.Lock()  # one frame with its buffers at a time
        self.calls: CallTable[PendingCall] = CallTable()
        self.serving: ServingTable[Any] = ServingTable()
        self.assembler = FrameAssembler(max_frame)
        self.limiter = _Limiter(max_in_flight)
        self.server: Optional["Server"] = None
        self.error: Optional[BaseException] = None  # why the connection ended
        self._ended = False
        self.done = threading.Event()
        self._on_done: List[Callable[[], None]] = []
        self._timer_cond = threading.Condition(self.lock)
        self._timer: Optional[threading.Thread] = None
        self._timer_at: Optional[int] = 0  # the deadline the timer sleeps until (0: it is not asleep; None: none)
        self.loop_reads = reads_in_loop(link)
        if self.loop_reads:
            link.spin_stretch = True  # request/response: a peer a little slower than a spin is the rule
        self._can_reserve = callable(getattr(link, "reserve", None)) and callable(getattr(link, "send_reserved", None))
        self._can_lend = callable(getattr(link, "lend", None)) and callable(getattr(link, "lendable", None))
        # Across machines monotonic clocks differ: a link that says so carries a REQUEST's
        # remaining budget in deadline_ns, which the receiver anchors to its own clock.
        self._shared_clock = bool(getattr(link, "shared_clock", True))
        self.reader = threading.Thread(target=self._run, name="shmhub-rpc-reader", daemon=True)
        self.role: Optional[threading.Thread] = None  # who reads the link now (see _run)
        self._reader_loop: Optional[asyncio.AbstractEventLoop] = None  # the loop whose thread reads (await_call)
        self._loop_reader: "Optional[asyncio.Task[None]]" = None  # its reader task, once the first reader is answered
        self._loop_waiting = 0  # acalls of that loop waiting for the reader
        self._role_cond = threading.Condition(self.lock)

    def start(self) -> None:
        if isinstance(self.link, Link):
            self.link.prepare_wait()  # the reader thread will sleep on it: its fd exists from here on
        self.reader.start()

    # -- reading ----------------------------------------------------------------------------
    #
    # One thread at a time holds the read role. A thread blocked in call() takes it when it is
    # free and reads until its own response came (no thread hand-off: the lowest latency); the
    # reader thread takes it whenever it is free and something may arrive that nobody else waits
    # for (a Server is attached, or calls are pending), and gives it up when neither holds. It
    # parks on a condition meanwhile: nothing polls.
    #
    # A quiet call (start_call(quiet=True): shmhub.executor's tasks) does not call the reader
    # thread: its caller will most likely read the response itself (submit(...).result()), and
    # waking the reader for it would put a thread hand-off on every round trip. Whatever waits
    # for it without reading calls want() first; at most QUIET_MAX are quiet at a time, since
    # an unread response holds shared memory.

    def _needs_reader(self) -> bool:
        return self.server is not None or self.calls.wants_reader()

    def want(self, cid: int) -> None:
        """A quiet call's response is awaited by a thread that does not read: the reader must."""
        with self.lock:
            if self.calls.want(cid) and self.role is None:
                self._role_cond.notify()

    def want_all(self) -> None:
        """Every quiet call is quiet no more (their responses are needed now)."""
        with self.lock:
            if self.calls.want_all() and self.role is None:
                self._role_cond.notify()

    def _release_role(self) -> None:
        with self.lock:
            self.role = None
            if self._needs_reader():
                self._role_cond.notify()

    def _run(self) -> None:
        while True:
            with self.lock:
                while self.error is None and not (self.role is None and self._needs_reader()):
                    self._role_cond.wait()
                if self.error is not None:
                    return
                self.role = self.reader
            while True:
                if not self.read_one(None):
                    return
                with self.lock:
                    if not self._needs_reader():
                        self.role = None
                        break

    def _left(self, call: PendingCall) -> Optional[float]:
        """Seconds left until the call's deadline (None: none); 0.0 once passed, and it expired."""
        rem = _remaining(call.deadline_ns)
        if rem == 0:
            self.expire(call)
        return rem

    def read_until(self, call: PendingCall) -> None:
        """Read as the role holder until `call` resolves (or its deadline), then hand the role on."""
        self._read_while(call.future, call.deadline_ns, call)

    def read_for(self, fut: "AnyFuture", timeout: Optional[float], also: Optional[Callable[[], bool]] = None) -> None:
        """If no thread reads the link now, read it in this one until fut (a call of this
        connection: settled by what is read, as a thread asleep in recv sees nothing else) is
        done or `also()` is true, or timeout, so that the response wakes no other thread on its
        way to the waiter; else return at once (the reader resolves them)."""
        with self.lock:
            if self.role is not None or self.error is not None:
                return
            self.role = threading.current_thread()
        self._read_while(fut, monotonic_deadline(timeout), None, also)

    def _read_while(self, fut: "AnyFuture", deadline_ns: int, call: Optional[PendingCall], also: Optional[Callable[[], bool]] = None) -> None:
        """Holding the role: read until fut is done (or also() is true) or the deadline (which
        expires `call`), then hand the role on."""
        try:
            while not fut.done() and (also is None or not also()):
                rem = _remaining(deadline_ns)
                if rem == 0:
                    if call is not None:
                        self.expire(call)
                    break
                if not self.read_one(rem):
                    break
        finally:
            self._release_role()

    async def aread(self, call: Optional[PendingCall] = None) -> None:
        """Read the link in the running event loop while this thread holds the read role: until
        `call` resolves or passes its deadline (an acall reading for itself), else until the
        connection ends or the task is cancelled (aserve, or a loop's reader task). The loop thread
        reads the link itself, so nothing is handed between threads. When the loop has other work
        ready it runs that first and looks again; otherwise a wait spins (the link's adaptive
        budget), then sleeps on the doorbell through the loop (aio.arecv). The caller releases the
        role."""
        from ..aio import arecv

        link = self.link
        # asyncio's run queue (private; None under uvloop, which then neither yields nor spins). A
        # spin holds the loop up to the budget (50 µs), so only while no other task could run.
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)
        # A loop watching other I/O than the link (a front's sockets: more fds than its self-pipe
        # and our doorbell) leaves that I/O waiting while it spins: there the spin is never
        # stretched (the HTTP front lost 15% of its requests/s with it).
        sel = getattr(loop, "_selector", None)
        fut = None if call is None else call.future
        rem: Optional[float] = None
        while fut is None or not fut.done():
            if call is not None:
                rem = self._left(call)
                if rem == 0:
                    return
            try:
                msg = link.try_recv()
                if msg is None:  # a wait (a message found at once costs nothing below)
                    if ready:
                        await asyncio.sleep(0)
                        continue
                    began = time.monotonic_ns()
                    alone = sel is not None and len(sel.get_map()) <= 2
                    if ready is not None:
                        budget = link.spin_budget() if alone else min(link.spin_budget(), link.spin_ns)
                        if budget:
                            ok = link._rx.spin_readable(budget if rem is None else min(budget, int(rem * 1e9)))
                            link.spin_result(ok)
                            if ok:
                                msg = link.try_recv()
                    if msg is None:
                        msg = await arecv(link, rem)
                        if alone:
                            link.spin_slept(time.monotonic_ns() - began)
            except ShmTimeout:
                continue
            except asyncio.CancelledError:
                raise  # arecv took nothing
            except BaseException as e:
                self._read_failed(e)
                return
            if not self._handle(msg):
                return

    async def await_call(self, call: PendingCall, holding: bool) -> Any:
        """The result of a call, awaited in an event loop. holding: start_call(read=True) took the
        read role for this thread, so this task reads until its response came; acalls of the same
        loop meanwhile wait for the reader, and if some still wait when it is done, a reader task
        of the loop reads on for them until the last is answered. A response read in the loop
        resolves its task with no thread hand-off."""
        fut = call.future
        loop = asyncio.get_running_loop()
        if holding:
            self._reader_loop = loop
            try:
                await self.aread(call)
            except asyncio.CancelledError:
                fut.cancel()  # the done callback sends CANCEL
                raise
            finally:
                if self._loop_waiting and self.error is None:
                    self._loop_reader = loop.create_task(self._read_for_loop())
                else:
                    self._reader_loop = None
                    self._release_role()
            return fut.result()
        if not fut.done():
            counted = self._reader_loop is loop
            waiter: asyncio.Future[None] = loop.create_future()
            me = threading.get_ident()
            fut.add_done_callback(lambda _: _wake_in(loop, me, waiter))
            if counted:
                self._loop_waiting += 1
            try:
                await waiter
            except asyncio.CancelledError:
                fut.cancel()
                raise
            finally:
                if counted:
                    self._loop_waiting -= 1
                    if not self._loop_waiting and self._loop_reader is not None:
                        self._stop_loop_reader()
        return fut.result()

    async def _read_for_loop(self) -> None:
        """The loop's reader task: reads for the acalls still waiting (the role is held)."""
        try:
            await self.aread()
        finally:
            if self._loop_reader is asyncio.current_task():  # else _stop_loop_reader released it
                self._stop_loop_reader()

    def _stop_loop_reader(self) -> None:
        """The loop's last waiting acall is answered (or the reader ended): the role goes back (to
        the reader thread if calls of other threads are pending), and the reader task ends."""
        task, self._loop_reader, self._reader_loop = self._loop_reader, None, None
        if task is not None:
            if task is not asyncio.current_task():
                task.cancel()
            self._release_role()

    def read_one(self, timeout: Optional[float]) -> bool:
        """Receive and dispatch one message; False once the connection has ended."""
        try:
            msg = self.link.recv(timeout=timeout)
        except ShmTimeout:
            return True
        except BaseException as e:
            self._read_failed(e)
            return False
        return self._handle(msg)

    def _read_failed(self, e: BaseException) -> None:
        if isinstance(e, _GONE):
            self.terminate(e)
            return
        if not isinstance(e, Exception):  # a broken link object: end the connection, say why
            self.terminate(LinkClosed(f"reading interrupted: {e!r}"))
            raise e
        log.exception("rpc: link.recv failed")
        self.terminate(e)

    def _handle(self, msg: Any) -> bool:
        """Dispatch one received message; False once the connection has ended."""
        try:
            inc = self.assembler.feed(msg)
            if inc is not None:
                self._dispatch(inc)
            return True
        except RpcProtocolError as e:
            self.terminate(e, close=True)
        except _GONE as e:
            self.terminate(e)
        except BaseException as e:
            log.exception("rpc: dispatch failed")
            self.terminate(RpcProtocolError(f"rpc dispatch failed: {e!r}"), close=True)
            if not isinstance(e, Exception):
                raise
        return False

    def _dispatch(self, inc: Incoming) -> None:
        h = inc.frame
        kind = h.kind
        if kind is K_REQUEST:
            if h.deadline_ns and not self._shared_clock:
                h.deadline_ns += time.monotonic_ns()  # the budget left when sent, from now
            server = self.server
            if server is None:
                from ._server import no_server

                no_server(self, inc)
            else:
                server.dispatch(self, inc)
            return
        if kind is K_CANCEL or kind is K_CREDIT:
            inc.release()
            with self.lock:
                st = self.serving.control(kind, h.call_id)
            if st is not None and self.server is not None:
                self.server.control(st, kind, h.arg)
            return
        final = kind is not K_ITEM
        with self.lock:
            call = self.calls.lookup_response(h.call_id)
            if call is not None and final:
                self.calls.finish(h.call_id)
        if call is None:  # a late response (cancelled / expired): its memory goes back now
            inc.release()
            return
        if (kind is K_ITEM or kind is K_END) and call.stream is None:
            inc.release()
            raise RpcProtocolError(f"{kind.name} frame for call {h.call_id}, which is not a stream")
        try:
            if kind is K_ERROR:
                settle(call.future, exc=decode_error(inc.payload(), self.codec))
            elif kind is K_END:
                settle(call.future, None)
            else:
                try:
                    value = self.codec.decode(inc.payload(), inc.views())
                except RpcProtocolError:
                    raise
                except Exception as e:  # this call alone fails (e.g. a class the caller cannot import)
                    if kind is K_ITEM:
                        with self.lock:
                            self.calls.finish(h.call_id)
                    settle(call.future, exc=e)
                else:
                    if kind is K_ITEM:
                        call.stream.put(value)  # type: ignore[union-attr]
                    else:
                        settle(call.future, value)
                    del value
        finally:
            inc.release()
            if call.stream is not None and call.future.done():
                call.stream.wake()  # a consumer parked on the empty stream learns that it ended

    # -- ending -----------------------------------------------------------------------------

    def terminate(self, err: BaseException, close: bool = False) -> None:
        """The connection ended: every call in flight fails with err (once), later ones at once."""
        with self.lock:
            if self.error is None:
                self.error = err
            err = self.error
            if self._ended:
                return
            self._ended = True
            calls = self.calls.drain()
            serving = self.serving.drain()
            self._timer_cond.notify_all()
            self._role_cond.notify_all()
        self.limiter.fail(err)
        self.assembler.reset()
        for _, call in calls:
            settle(call.future, exc=err)
            if call.stream is not None:
                call.stream.wake()
        server = self.server
        if server is not None:
            for st in serving:
                server.control(st, K_CANCEL, 0)
        if close:
            try:
                self.link.close()
            except Exception:
                log.exception("rpc: closing the link failed")
        _forget(self)
        self.done.set()
        for fn in self._on_done:
            fn()

    def close(self) -> None:
        """Close the link: the reader ends, calls in flight fail with LinkClosed."""
        try:
            self.link.close()
        finally:
            self.terminate(LinkClosed("link is closed"))
            if threading.current_thread() is not self.reader and self.reader.is_alive():
                # A reader asleep in recv notices the close within the link's close-check time.
                self.reader.join(1.0)

    def when_done(self, fn: Callable[[], None]) -> None:
        """Run fn (in the thread that ends the connection, or now if it has ended)."""
        with self.lock:
            if not self._ended:
                self._on_done.append(fn)
                return
        self.done.wait()  # _ended is set just before done: fn runs after done, as it would have
        fn()

    def check(self) -> None:
        err = self.error
        if err is not None:
            raise _again(err)

    # -- calls ------------------------------------------------------------------------------

    def start_call(
        self,
        method: str,
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        deadline_ns: int,
        stream: "bool | StreamState" = False,
        read: bool = False,
        lean: bool = False,
        quiet: bool = False,
    ) -> Tuple[PendingCall, bool]:
        """Send a REQUEST (an in-flight permit is held by the caller); the call owns the permit.
        stream: True (or the StreamState to fill) for a streamed call. read: take the read role if
        it is free; the second value says whether it was taken (the caller must then call
        read_until). lean: the call's future is a CallFuture (call/acall: never seen by users).
        quiet: do not call the reader thread for it (see want())."""
        try:
            payload, oob = self.codec.encode_call(args, kwargs)
        except BaseException:
            self.limiter.release()  # nothing was sent: the permit goes back
            raise
        fut: AnyFuture = CallFuture() if lean else LazyFuture()
        st = None
        if stream is not False:
            st = stream if isinstance(stream, StreamState) else StreamState()
        call = PendingCall(self, fut, deadline_ns, st)
        if isinstance(st, CallbackStream):
            st.call = call
        with self.lock:
            if self.error is not None:
                self.limiter.release()
                raise _again(self.error)
            if quiet and len(self.calls.quiet) >= QUIET_MAX:
                self.calls.want_all()  # and this one is read by the reader thread with them
                quiet = False
            cid = call.cid = self.calls.start(call, deadline_ns, quiet)
            if not read and not quiet and self.role is None:
                self._role_cond.notify()
            if deadline_ns:
                self._arm_timer(deadline_ns)
        fut.add_done_callback(self._settled(cid))  # a closure: a bound method of call would make a cycle (GC work per call)
        flags = FLAG_STREAM if stream else 0
        try:
            sent = False
            if read:
                # A caller that will read tries to send without waiting first: one that must wait
                # (a full ring, no slot) leaves the reading to the reader thread meanwhile, since
                # reading may be what frees the room.
                try:
                    self.send_frame(K_REQUEST, cid, payload, oob, flags=flags, deadline_ns=deadline_ns, method=method, nowait=True)
                    sent = True
                except WouldBlock:
                    with self.lock:
                        if self.role is None:
                            self._role_cond.notify()
            if not sent:
                self.send_frame(K_REQUEST, cid, payload, oob, flags=flags, deadline_ns=deadline_ns, method=method, deadline_for_send=deadline_ns)
        except BaseException as e:
            with self.lock:
                self.calls.finish(cid)
            if isinstance(e, ShmTimeout) and not isinstance(e, DeadlineExceeded):
                e = DeadlineExceeded(f"deadline passed while sending the call to {method!r}")
            settle(fut, exc=e if isinstance(e, Exception) else LinkClosed(f"send interrupted: {e!r}"))
            if not isinstance(e, Exception):
                raise
            return call, False
        reading = False
        if read:
            with self.lock:
                if self.role is None:
                    self.role = threading.current_thread()
                    reading = True
        return call, reading

    def _settled(self, cid: int) -> Callable[["AnyFuture"], None]:
        def done(fut: "AnyFuture") -> None:
            # Runs once per call, in whichever thread settled it.
            if fut.cancelled():
                # CANCELLED -> CANCELLED_AND_NOTIFIED, as an executor's worker does: until then
                # concurrent.futures.wait() and as_completed() do not count the future as done.
                fut.set_running_or_notify_cancel()
            unanswered = False
            if cid in self.calls.pending:  # else answered (the common case): no lock round
                with self.lock:
                    unanswered = self.calls.finish(cid) is not None
            self.limiter.release()
            if unanswered and self.error is None:  # cancelled or expired here: tell the server
                try:
                    self.send_frame(K_CANCEL, cid, b"", (), deadline_for_send=monotonic_deadline(1.0))
                except Exception:
                    pass  # the link is gone or stuck: the server learns from that instead

        return done

    def expire(self, call: PendingCall) -> None:
        settle(call.future, exc=DeadlineExceeded(f"call {call.cid} passed its deadline"))

    def _arm_timer(self, deadline_ns: int) -> None:
        """Deadlines are enforced by one thread per connection, asleep until the earliest (lock
        held). It is woken only for a deadline earlier than that: not once per call."""
        if self._timer is None:
            self._timer = threading.Thread(target=self._timer_loop, name="shmhub-rpc-deadlines", daemon=True)
            self._timer.start()
        elif self._timer_at is None or deadline_ns < self._timer_at:
            self._timer_cond.notify()

    def _timer_loop(self) -> None:
        with self.lock:
            while self.error is None:
                nxt = self.calls.next_deadline()
                now = time.monotonic_ns()
                if nxt is not None and nxt <= now:
                    expired = self.calls.expired(now)
                    self._timer_at = 0  # awake: it looks again before it sleeps
                    self.lock.release()
                    try:
                        for cid, call in expired:
                            # Put back so the done callback sees it unanswered and sends CANCEL.
                            with self.lock:
                                self.calls.pending[cid] = call
                            self.expire(call)
                    finally:
                        self.lock.acquire()
                    continue
                self._timer_at = nxt
                self._timer_cond.wait(None if nxt is None else (nxt - now) / 1e9)
                self._timer_at = 0

    # -- sending ----------------------------------------------------------------------------

    def send_frame(
        self,
        kind: Kind,
        cid: int,
        payload: bytes,
        oob: Sequence[Any],
        *,
        flags: int = 0,
        deadline_ns: int = 0,
        arg: int = 0,
        method: str = "",
        deadline_for_send: int = 0,
        nowait: bool = False,
    ) -> None:
        """A header frame, then its out-of-band buffers, none interleaved with other frames.
        Buffers are written to shared memory (reserved) before the send lock is taken. nowait:
        WouldBlock, with nothing sent, where the buffers' reservations, the send lock or the
        header would wait (the buffers' own ring frames, announced by the header, still may)."""
        link = self.link
        if not oob:  # most frames: nothing to stage, nothing to give back on failure
            if deadline_ns and not self._shared_clock:
                deadline_ns = max(1, deadline_ns - time.monotonic_ns())
            head = encode_header(kind, cid, payload, flags, deadline_ns, arg, method, ())
            if deadline_for_send or nowait:
                self._lock_send(nowait, deadline_for_send)
            else:
                self.send_lock.acquire()
            try:
                link.send(head, timeout=0.0 if nowait else _remaining(deadline_for_send))
                _crash.point(b"rpc.header_sent")
            except ShmTimeout:
                if nowait:
                    raise WouldBlock from None
                raise
            finally:
                self.send_lock.release()
            return
        descs: List[Tuple[int, int]] = []
        outs: List[Tuple[Any, int]] = []  # (reserved message, nbytes), (memoryview, -1) or (memoryview, _LEND)
        try:
            for pb in oob:
                off, n, out = self._stage(pb, deadline_for_send, nowait)
                descs.append((off, n))
                outs.append(out)
                _crash.point(b"rpc.staged")
            if deadline_ns and not self._shared_clock:
                deadline_ns = max(1, deadline_ns - time.monotonic_ns())
            head = encode_header(kind, cid, payload, flags, deadline_ns, arg, method, descs)
            self._lock_send(nowait, deadline_for_send)
        except BaseException:
            for buf, nbytes in outs:
                if nbytes >= 0 and getattr(buf, "token", None) is not None:
                    buf.release()
            raise
        try:
            try:
                link.send(head, timeout=0.0 if nowait else _remaining(deadline_for_send))
                _crash.point(b"rpc.header_sent")
            except BaseException as e:
                for buf, nbytes in outs:
                    if nbytes >= 0 and getattr(buf, "token", None) is not None:
                        buf.release()
                if nowait and isinstance(e, ShmTimeout):
                    raise WouldBlock from None
                raise
            # The header announced these buffers: from here on only the peer's end stops us.
            for i, (buf, nbytes) in enumerate(outs):
                try:
                    if nbytes >= 0:
                        link.send_reserved(buf, nbytes, timeout=None)
                    elif nbytes != _LEND or not link.lend(buf, timeout=None):
                        link.send(buf, timeout=None)
                    _crash.point(b"rpc.buffer_sent")
                except BaseException as e:
                    for b, nb in outs[i:]:
                        if nb >= 0 and getattr(b, "token", None) is not None:
                            b.release()
                    if not isinstance(e, _GONE):  # the peer now waits for buffers that never come
                        self.terminate(RpcProtocolError(f"frame broken off mid-buffers: {e!r}"), close=True)
                    raise
        finally:
            self.send_lock.release()

    def _lock_send(self, nowait: bool, deadline_ns: int) -> None:
        """Take the send lock: WouldBlock (nowait) or DeadlineExceeded if it is not had in time."""
        if nowait:
            if not self.send_lock.acquire(False):
                raise WouldBlock
            return
        rem = _remaining(deadline_ns)
        if not self.send_lock.acquire(timeout=-1 if rem is None else rem):
            raise DeadlineExceeded("deadline passed waiting to send")

    def _stage(self, pb: Any, deadline_ns: int, nowait: bool = False) -> Tuple[int, int, Tuple[Any, int]]:
        """(offset, length, what to send) of an out-of-band buffer: a reserved message of this link
        that already holds it (zero-copy, from link.empty()), a freshly reserved copy, or the
        buffer itself for links without reserve()."""
        raw = pb.raw()
        n = raw.nbytes
        if not self._can_reserve:
            return 0, n, (raw, -1)
        owned = _reserved_by(raw, self.link)
        if owned is not None:
            buf, off = owned
            return off, n, (buf, off + n)
        if self._can_lend and self.link.lendable(raw):  # a payload received here (an echo, a forward)
            return 0, n, (raw, _LEND)
        try:
            buf = self.link.reserve(n, timeout=0.0 if nowait else _remaining(deadline_ns))
        except ShmTimeout:
            if nowait:
                raise WouldBlock from None
            raise
        try:
            with memoryview(buf) as dst:
                dst[:n] = raw
        except BaseException:
            buf.release()
            raise
        return 0, n, (buf, n)


_LEND = -2  # _stage: a buffer received on the link, sent back by reference (Link.lend)


def reads_in_loop(link: Any) -> bool:
    """Whether an event loop can read this link itself (aread_until needs aio's doorbell waits)."""
    return isinstance(link, Link)


def _reserved_by(raw: memoryview, link: Any) -> Optional[Tuple[Any, int]]:
    """The reserved send buffer of `link` that `raw` (a numpy array's data) lies in, with its offset."""
    obj: Any = raw.obj
    if type(obj).__module__ != "numpy":
        return None
    from .._native import Message

    base: Any = obj
    while base is not None and not isinstance(base, Message):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    buf: Any = base  # a Message (or None)
    if buf is None or buf.token is None or buf.token[0] is not link or not buf.writable:
        return None
    import numpy as np

    start = np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    addr = obj.__array_interface__["data"][0]
    off = addr - start
    if not obj.flags.c_contiguous or off < 0 or off + raw.nbytes > len(buf):
        return None
    return buf, off


def _again(err: BaseException) -> BaseException:
    """A fresh exception of the same kind for a call made after the connection ended."""
    try:
        return type(err)(*err.args)
    except Exception:
        return LinkClosed(f"rpc connection ended: {err!r}")


_registry: Dict[int, Connection] = {}
_registry_lock = threading.Lock()


def connection_for(
    link: Any,
    codec: "Optional[Codec | str]" = None,
    max_in_flight: int = 64,
    max_frame: int = DEFAULT_MAX_FRAME,
    server: Optional["Server"] = None,
    role: Optional[threading.Thread] = None,
) -> Connection:
    """The connection of a link, created (and its reader started) on first use. Both ends of a
    link must use the same codec. `server` serves requests from the first frame on; `role` takes
    the read role for that thread if it is free, before the server is set (Server.aserve)."""
    with _registry_lock:
        conn = _registry.get(id(link))
        if conn is not None and conn.link is link and conn.error is None:
            if codec is not None and codec_for(codec).name != conn.codec.name:
                raise ValueError(f"this link already speaks the {conn.codec.name} codec")
            if server is not None:
                with conn.lock:
                    if conn.server is not None and conn.server is not server:
                        raise ValueError("another Server already serves this link")
                    if role is not None and conn.role is None:
                        conn.role = role
                    conn.server = server
                    conn._role_cond.notify()  # a parked reader thread now has something to read
            return conn
        conn = Connection(link, codec_for(codec), max_in_flight, max_frame)
        conn.server = server
        conn.role = role
        _registry[id(link)] = conn
    conn.start()
    return conn


def _forget(conn: Connection) -> None:
    with _registry_lock:
        if _registry.get(id(conn.link)) is conn:
            del _registry[id(conn.link)]
