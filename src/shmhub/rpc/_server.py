"""The serving side: handler lookup, sync handlers in a bounded thread pool, async handlers in
the server's event loop thread, streaming with credits, cancellation and deadlines."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextvars
import inspect
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple, TypeVar
from types import GeneratorType

from ..errors import DeadlineExceeded, HostGone, LinkClosed, LinkCorrupted, PeerDead, RpcProtocolError, ShmTimeout
from ._codec import Codec
from ._conn import Connection, WouldBlock, connection_for, reads_in_loop
from ._protocol import ERR_DEADLINE, ERR_EXCEPTION, ERR_NOT_FOUND, DEFAULT_MAX_FRAME, Incoming, encode_error
from ._wire import FLAG_STREAM, K_CREDIT, K_END, K_ERROR, K_ITEM, K_RESULT, Kind

__all__ = ["Server", "aserve", "serve", "cancelled", "inline", "STREAM_WINDOW"]

log = logging.getLogger("shmhub.rpc")

# A streaming handler may run this many items ahead of its consumer; the consumer grants more
# with CREDIT frames as it takes them, so a fast generator cannot fill the caller's memory.
STREAM_WINDOW = 32

_GONE = (PeerDead, HostGone, LinkClosed, LinkCorrupted)


class _Serving:
    """One call being served."""

    __slots__ = ("conn", "cid", "deadline_ns", "stream", "cancelled", "timed_out", "task", "loop", "credit", "cond", "async_credit")

    def __init__(self, conn: Connection, cid: int, deadline_ns: int, stream: bool) -> None:
        self.conn = conn
        self.cid = cid
        self.deadline_ns = deadline_ns
        self.stream = stream
        self.cancelled = False
        self.timed_out = False  # its deadline cancelled the task running it
        self.task: Optional["asyncio.Task[Any]"] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.credit = STREAM_WINDOW
        self.cond = threading.Condition(threading.Lock()) if stream else _NO_COND
        self.async_credit: Optional[asyncio.Event] = None

    def expired(self) -> bool:
        return bool(self.deadline_ns) and time.monotonic_ns() >= self.deadline_ns

    def wait_credit(self) -> bool:
        """Block until the consumer grants an item (True), or the call ends (False)."""
        with self.cond:
            while self.credit <= 0 and not self.cancelled:
                rem = None if not self.deadline_ns else (self.deadline_ns - time.monotonic_ns()) / 1e9
                if rem is not None and rem <= 0:
                    return False
                self.cond.wait(rem)
            if self.cancelled:
                return False
            self.credit -= 1
            return True


class _NoCond:
    """Stands in for the condition of a call that does not stream (nothing waits on it)."""

    def __enter__(self) -> "_NoCond":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def notify_all(self) -> None:
        pass


_NO_COND: Any = _NoCond()

_current: contextvars.ContextVar[Optional[_Serving]] = contextvars.ContextVar("shmhub_rpc_call", default=None)


def cancelled() -> bool:
    """Inside a handler: True once the caller cancelled the call, its deadline passed, or the
    connection ended. Long-running sync handlers poll it where they choose."""
    st = _current.get()
    return st is not None and (st.cancelled or st.expired())


F = TypeVar("F", bound=Callable[..., Any])


def inline(fn: F) -> F:
    """Mark a sync handler to run on the connection's reader thread instead of the pool: no
    thread hand-off (the lowest latency), but the reader serves nothing else while it runs, so
    only for handlers that are quick and never block."""
    fn.__shmhub_rpc_inline__ = True  # type: ignore[attr-defined]
    return fn


_ASYNC, _INLINE, _POOL = "async", "inline", "pool"


def _where(fn: Callable[..., Any]) -> str:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return _ASYNC
    return _INLINE if getattr(fn, "__shmhub_rpc_inline__", False) else _POOL


def _resolve(handlers: Any) -> Callable[[str], Optional[Callable[..., Any]]]:
    """Name -> callable: mapping keys (a dotted name reaches into a mapped object's public
    attributes), or an object's public methods."""

    def walk(obj: Any, parts: List[str]) -> Optional[Callable[..., Any]]:
        for p in parts:
            if not p or p.startswith("_"):
                return None
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return obj if callable(obj) else None

    if isinstance(handlers, Mapping):
        table: Dict[str, Any] = dict(handlers)

        def find(name: str) -> Optional[Callable[..., Any]]:
            fn = table.get(name)
            if fn is not None:
                return fn if callable(fn) else None
            head, _, rest = name.partition(".")
            if rest and head in table:
                return walk(table[head], rest.split("."))
            return None

        return find
    return lambda name: walk(handlers, name.split("."))


def _names(handlers: Any) -> str:
    if isinstance(handlers, Mapping):
        names = sorted(handlers)
    else:
        names = sorted(n for n in dir(handlers) if not n.startswith("_") and callable(getattr(handlers, n, None)))
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return shown or "none"


class Server:
    """Serves handlers over links: `Server(handlers).serve(link)`. Sync handlers run in a pool of
    max_concurrency threads (more calls queue), async ones in the server's own event loop thread."""

    def __init__(
        self, handlers: Any, *, max_concurrency: int = 32, codec: "Optional[Codec | str]" = None, max_in_flight: int = 64, max_frame: int = DEFAULT_MAX_FRAME
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.handlers = handlers
        self._find = _resolve(handlers)
        self.max_concurrency = max_concurrency
        self.codec = codec
        self.max_in_flight = max_in_flight
        self.max_frame = max_frame
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_ident = 0  # the thread running _loop (compared per call: no loop lookup, a syscall in 3.11)
        self._loop_thread: Optional[threading.Thread] = None
        self._hows: Dict[Any, str] = {}  # handler -> where it runs (see _how)
        self._lock = threading.Lock()
        self._conns: Set[Connection] = set()
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    def attach(self, link: Any) -> Connection:
        """Serve on a link without blocking; the connection is returned (its .done event is set
        when the link ends)."""
        conn = connection_for(link, self.codec, self.max_in_flight, self.max_frame, server=self)
        with self._lock:
            self._conns.add(conn)
        return conn

    def serve(self, link: Any, timeout: Optional[float] = None) -> None:
        """Serve until the link closes or the peer is gone (returns), or until timeout (ShmTimeout
        subclass DeadlineExceeded). A malformed frame from the peer raises RpcProtocolError."""
        conn = self.attach(link)
        if not conn.done.wait(timeout):
            raise DeadlineExceeded(f"serve() ran for its timeout of {timeout} s")
        with self._lock:
            self._conns.discard(conn)
        if isinstance(conn.error, RpcProtocolError):
            raise conn.error

    async def aserve(self, link: Any, timeout: Optional[float] = None) -> None:
        """serve() in the running event loop, which runs the async handlers and reads the link
        itself: a request reaches its handler task with no thread hand-off. Sync handlers still
        run in the pool. Do not block this loop (nor call Client.call from it): it is the reader."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._loop is None:
                self._loop, self._loop_ident = loop, threading.get_ident()
            elif self._loop is not loop:
                raise ValueError("this Server's async handlers already run in another event loop")
        me = threading.current_thread()
        conn = connection_for(link, self.codec, self.max_in_flight, self.max_frame, server=self, role=me if reads_in_loop(link) else None)
        with self._lock:
            self._conns.add(conn)
        try:
            if conn.role is me:
                reader: Any = _reading(conn)
            else:  # not a shared-memory link, or its reader thread was reading already: it goes on
                reader = loop.create_future()
                conn.when_done(lambda: _set_done(loop, reader))
            try:
                await asyncio.wait_for(reader, timeout)
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"aserve() ran for its timeout of {timeout} s") from None
        finally:
            with self._lock:
                self._conns.discard(conn)
                if self._loop is loop and self._loop_thread is None:
                    self._loop, self._loop_ident = None, 0
        if isinstance(conn.error, RpcProtocolError):
            raise conn.error

    def close(self) -> None:
        """Stop the pool and the event loop (handlers still running are not waited for)."""
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        loop, th = self._loop, self._loop_thread
        if loop is not None and th is not None:
            loop.call_soon_threadsafe(loop.stop)
            if th is not threading.current_thread():
                th.join(5.0)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get_pool(self) -> cf.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = cf.ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="shmhub-rpc-handler")
            return self._pool

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    try:
                        loop.run_forever()
                    finally:
                        loop.close()

                self._loop_thread = threading.Thread(target=run, name="shmhub-rpc-loop", daemon=True)
                self._loop_thread.start()
                ready.wait(5.0)
                self._loop, self._loop_ident = loop, self._loop_thread.ident or 0
            return self._loop

    # -- dispatch (reader thread) -----------------------------------------------------------

    def dispatch(self, conn: Connection, inc: Incoming) -> None:
        h = inc.frame
        stream = bool(h.flags & FLAG_STREAM)
        st = _Serving(conn, h.call_id, h.deadline_ns, stream)
        try:
            with conn.lock:
                conn.serving.request(h.call_id, st)
        except RpcProtocolError:
            inc.release()  # a duplicate call id: the connection ends, the frame's memory goes back now
            raise
        try:
            if st.expired():  # never start an expired call
                inc.release()
                return self._fail(st, DeadlineExceeded(f"call to {h.method!r} arrived after its deadline"), ERR_DEADLINE)
            fn = self._find(h.method)
            if fn is None:
                inc.release()
                return self._fail(st, LookupError(f"no method {h.method!r} on the serving end (it has: {_names(self.handlers)})"), ERR_NOT_FOUND)
            try:
                args, kwargs = conn.codec.decode_call(inc.payload(), inc.views())
            except Exception as e:  # this call alone fails
                return self._fail(st, e, ERR_EXCEPTION)
            finally:
                inc.release()
            how = self._how(fn)
            if how is _ASYNC:
                loop = self._loop or self._get_loop()
                st.loop = loop
                if threading.get_ident() == self._loop_ident:  # aserve: read in this very loop
                    self._start_task(st, fn, args, kwargs)
                else:
                    loop.call_soon_threadsafe(self._start_task, st, fn, args, kwargs)
            elif how is _INLINE:
                self._run_sync(st, fn, args, kwargs)  # opted in: quick, never blocks (see inline())
            else:
                (self._pool or self._get_pool()).submit(self._run_sync, st, fn, args, kwargs)
        except RuntimeError as e:  # the pool or loop was shut down
            self._fail(st, e, ERR_EXCEPTION)

    def _how(self, fn: Callable[..., Any]) -> str:
        """Where a handler runs: _ASYNC (the loop), _INLINE (the reader) or _POOL. Cached per
        handler: inspect, and a getattr that misses, showed in profiles."""
        try:
            return self._hows[fn]
        except KeyError:
            pass
        except TypeError:  # unhashable
            return _where(fn)
        how = self._hows[fn] = _where(fn)
        return how

    def control(self, st: _Serving, kind: Kind, arg: int) -> None:
        """A CANCEL or CREDIT for a call being served (reader thread, or the connection's end)."""
        if kind is K_CREDIT:
            with st.cond:
                st.credit += arg
                st.cond.notify_all()
            if st.loop is not None and st.async_credit is not None:
                st.loop.call_soon_threadsafe(st.async_credit.set)
            return
        with st.cond:
            st.cancelled = True
            st.cond.notify_all()
        loop = st.loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self._cancel_task, st)
            except RuntimeError:
                pass

    @staticmethod
    def _cancel_task(st: _Serving) -> None:
        if st.task is not None:
            st.task.cancel()
        if st.async_credit is not None:
            st.async_credit.set()

    # -- running handlers -------------------------------------------------------------------

    def _finish(self, st: _Serving) -> bool:
        """Forget the call; False if it was cancelled (nothing more is sent for it)."""
        with st.conn.lock:
            st.conn.serving.done(st.cid)
        return not st.cancelled

    def _fail(self, st: _Serving, exc: BaseException, code: int) -> None:
        if self._finish(st):
            self._send(st, K_ERROR, encode_error(exc, st.conn.codec, code), ())

    def _send(self, st: _Serving, kind: Kind, payload: bytes, oob: Any) -> None:
        try:
            # Bounded by the call's deadline: after it the caller has given up on the result.
            st.conn.send_frame(kind, st.cid, payload, oob, deadline_for_send=st.deadline_ns)
        except _GONE:
            pass  # the caller is gone: the result is dropped (its reserved memory was given back)
        except ShmTimeout:
            pass  # the deadline passed while waiting for ring room, a slot or a mapping: dropped

    async def _asend(self, st: _Serving, kind: Kind, payload: bytes, oob: Any) -> None:
        """_send() from an event loop: at once if nothing has to wait, else from a thread, so that
        the loop goes on reading meanwhile (reading may be what frees the room)."""
        try:
            st.conn.send_frame(kind, st.cid, payload, oob, nowait=True)
            return
        except WouldBlock:
            pass
        except (*_GONE, ShmTimeout):
            return  # as _send: dropped
        await asyncio.get_running_loop().run_in_executor(None, self._send, st, kind, payload, oob)

    def _encode(self, st: _Serving, kind: Kind, value: Any) -> Optional[Tuple[bytes, Any]]:
        """The encoded reply, or None if there is nothing to send (it failed, or was cancelled)."""
        try:
            payload, oob = st.conn.codec.encode(value)
        except Exception as e:  # a result that does not encode fails this call alone
            if kind is K_ITEM:
                raise
            self._fail(st, e, ERR_EXCEPTION)
            return None
        if kind is not K_ITEM and not self._finish(st):
            return None
        return payload, oob

    def _reply(self, st: _Serving, kind: Kind, value: Any) -> None:
        enc = self._encode(st, kind, value)
        if enc is not None:
            self._send(st, kind, enc[0], enc[1])

    async def _areply(self, st: _Serving, kind: Kind, value: Any) -> None:
        enc = self._encode(st, kind, value)
        if enc is not None:
            await self._asend(st, kind, *enc)

    def _run_sync(self, st: _Serving, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if st.cancelled:  # a queued call that was cancelled is dropped
            self._finish(st)
            return
        if st.expired():
            return self._fail(st, DeadlineExceeded("the call's deadline passed while it was queued"), ERR_DEADLINE)
        token = _current.set(st)
        try:
            result = fn(*args, **kwargs)
            del args, kwargs
            if st.stream:
                self._stream_sync(st, result)
            elif isinstance(result, GeneratorType):
                result.close()
                raise TypeError(f"handler {getattr(fn, '__name__', fn)!r} is a generator: call it with client.stream()")
            else:
                self._reply(st, K_RESULT, result)
        except BaseException as e:
            self._fail(st, e, ERR_EXCEPTION)
        finally:
            _current.reset(token)

    def _stream_sync(self, st: _Serving, result: Any) -> None:
        it: Iterator[Any] = iter(result)
        try:
            for item in it:
                if not st.wait_credit():
                    break
                self._reply(st, K_ITEM, item)
            else:
                if self._finish(st):
                    self._send(st, K_END, b"", ())
                return
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        if st.expired() and not st.cancelled:
            self._fail(st, DeadlineExceeded("the stream's deadline passed"), ERR_DEADLINE)
        else:
            self._finish(st)

    def _start_task(self, st: _Serving, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if st.cancelled:
            self._finish(st)
            return
        assert st.loop is not None
        st.task = st.loop.create_task(self._run_async(st, fn, args, kwargs))

    async def _run_async(self, st: _Serving, fn: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        _current.set(st)  # this task's own context
        try:
            if inspect.isasyncgenfunction(fn):
                agen = fn(*args, **kwargs)
                if not st.stream:
                    await agen.aclose()
                    raise TypeError(f"handler {fn.__name__!r} is an async generator: call it with client.stream()")
                await self._stream_async(st, agen)
                return
            coro = fn(*args, **kwargs)
            del args, kwargs
            if st.deadline_ns:
                # The deadline cancels this very task (not asyncio.wait_for: a second task and
                # future per call, 10 µs of an HTTP worker's request).
                loop = st.loop
                assert loop is not None
                timer = loop.call_at(loop.time() + (st.deadline_ns - time.monotonic_ns()) / 1e9, _expire, st)
                try:
                    result = await coro
                finally:
                    timer.cancel()
            else:
                result = await coro
            await self._areply(st, K_RESULT, result)
        except asyncio.CancelledError:
            if st.timed_out and not st.cancelled:
                self._fail(st, DeadlineExceeded("the call's deadline passed while it ran"), ERR_DEADLINE)
            else:
                self._finish(st)  # cancelled by the caller: nothing is sent
        except BaseException as e:
            self._fail(st, e, ERR_EXCEPTION)

    async def _stream_async(self, st: _Serving, agen: Any) -> None:
        st.async_credit = asyncio.Event()
        try:
            async for item in agen:
                while True:
                    with st.cond:
                        if st.cancelled:
                            return
                        if st.credit > 0:
                            st.credit -= 1
                            break
                        st.async_credit.clear()
                    await st.async_credit.wait()
                await self._areply(st, K_ITEM, item)
            if self._finish(st):
                await self._asend(st, K_END, b"", ())
        finally:
            await agen.aclose()
            self._finish(st)


def no_server(conn: Connection, inc: Incoming) -> None:
    """A REQUEST on a link nobody serves: answer it with a clear error."""
    h = inc.frame
    inc.release()
    with conn.lock:
        conn.serving.request(h.call_id, None)
        conn.serving.done(h.call_id)
    try:
        conn.send_frame(
            K_ERROR, h.call_id, encode_error(LookupError(f"no method {h.method!r}: nothing serves on this end of the link"), conn.codec, ERR_NOT_FOUND), ()
        )
    except _GONE:
        pass


async def _reading(conn: Connection) -> None:
    try:
        await conn.aread()
    finally:
        conn._release_role()


def _expire(st: _Serving) -> None:
    """An async handler ran past its deadline: its task is cancelled, the caller told."""
    st.timed_out = True
    if st.task is not None:
        st.task.cancel()


def _set_done(loop: asyncio.AbstractEventLoop, fut: "asyncio.Future[None]") -> None:
    """From any thread: resolve fut in its loop (unless the loop is closed: nobody awaits it)."""

    def resolve() -> None:
        if not fut.done():
            fut.set_result(None)

    try:
        loop.call_soon_threadsafe(resolve)
    except RuntimeError:
        pass


def serve(link: Any, handlers: Any, *, max_concurrency: int = 32, codec: "Optional[Codec | str]" = None, timeout: Optional[float] = None) -> None:
    """Serve handlers on a link until it closes or the peer is gone, then close it: a guest says
    goodbye, so its host reports it exited rather than died. Runs aserve() in an event loop of
    its own in this thread (async handlers run there, sync ones in a pool of max_concurrency
    threads); from a thread whose loop is running, the connection's reader thread serves instead."""
    if asyncio._get_running_loop() is None:
        asyncio.run(aserve(link, handlers, max_concurrency=max_concurrency, codec=codec, timeout=timeout))
        return
    with Server(handlers, max_concurrency=max_concurrency, codec=codec) as server:
        server.serve(link, timeout)
    link.close()


async def aserve(link: Any, handlers: Any, *, max_concurrency: int = 32, codec: "Optional[Codec | str]" = None, timeout: Optional[float] = None) -> None:
    """serve() in the running event loop (Server.aserve): async handlers get requests with no
    thread hand-off. Closes the link at the end, as serve() does."""
    with Server(handlers, max_concurrency=max_concurrency, codec=codec) as server:
        await server.aserve(link, timeout)
    link.close()
