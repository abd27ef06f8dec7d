"""The calling side: call / submit / acall / stream over a link's connection."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from typing import Any, AsyncIterator, Callable, Dict, Iterator, Optional, Tuple, cast

from ..errors import DeadlineExceeded
from ._codec import Codec
from ._conn import CallbackStream, Connection, PendingCall, connection_for, monotonic_deadline
from ._protocol import DEFAULT_MAX_FRAME
from ._server import STREAM_WINDOW
from ._wire import Kind

__all__ = ["Client", "Stream"]


class Client:
    """Calls the handlers served at the other end of a link. Thread-safe; usable from threads and
    from asyncio at once. At most max_in_flight calls are in flight: more block (or await).

    The client's connection owns the link: close() closes it."""

    def __init__(self, link: Any, *, codec: "Optional[Codec | str]" = None, max_in_flight: int = 64, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._conn: Connection = connection_for(link, codec, max_in_flight, max_frame)
        self.link = link

    def submit(self, method: str, /, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> "cf.Future[Any]":
        """Send a call; its Future resolves with the result or the remote error. cancel() sends a
        cancel. Blocks while max_in_flight calls are in flight (at most until the deadline)."""
        deadline = monotonic_deadline(timeout)
        conn = self._conn
        conn.check()
        conn.limiter.acquire(deadline)
        return cast("cf.Future[Any]", conn.start_call(method, args, kwargs, deadline)[0].future)  # not lean: a real Future

    def call(self, method: str, /, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Call and wait: the result, or the handler's exception raised here; DeadlineExceeded
        (a TimeoutError) at the deadline even if the server is stuck."""
        deadline = monotonic_deadline(timeout)
        conn = self._conn
        conn.check()
        conn.limiter.acquire(deadline)
        call, reading = conn.start_call(method, args, kwargs, deadline, read=True, lean=True)
        if reading:
            conn.read_until(call)
        return _wait(call)

    async def acall(self, method: str, /, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """call() for asyncio; cancelling the awaiting task cancels the call."""
        return await self._acall(method, args, kwargs, timeout)

    async def _acall(
        self, method: str, args: Tuple[Any, ...], kwargs: Dict[str, Any], timeout: Optional[float], on_sent: Optional[Callable[[], None]] = None
    ) -> Any:
        """acall(); on_sent() runs once the request is sent (shmhub.http orders its body after it)."""
        deadline = monotonic_deadline(timeout)
        conn = self._conn
        conn.check()
        await conn.limiter.aacquire(deadline)
        call, holding = conn.start_call(method, args, kwargs, deadline, read=conn.loop_reads and conn.server is None, lean=True)
        if on_sent is not None and not call.future.done():
            on_sent()
        # A pure client's loop reads its responses itself (no thread hand-off); a link this end
        # also serves keeps the reader thread, which runs @inline handlers the loop must not.
        return await conn.await_call(call, holding)

    def stream(self, method: str, /, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> "Stream":
        """Call a generator handler: iterate the result (for, or async for) as items arrive.
        The timeout bounds the whole stream."""
        deadline = monotonic_deadline(timeout)
        conn = self._conn
        conn.check()
        conn.limiter.acquire(deadline)
        return Stream(conn, conn.start_call(method, args, kwargs, deadline, stream=True)[0])

    def submit_stream(self, method: str, /, *args: Any, on_item: Callable[[Any], None], timeout: Optional[float] = None, **kwargs: Any) -> "cf.Future[None]":
        """Call a generator handler with no consumer thread: on_item(item) runs in the connection's
        reader thread for each item, in order (keep it quick: reading waits for it). The Future
        resolves with None after the last item, or with the handler's error; cancel() stops it."""
        deadline = monotonic_deadline(timeout)
        conn = self._conn
        conn.check()
        conn.limiter.acquire(deadline)
        return cast("cf.Future[None]", conn.start_call(method, args, kwargs, deadline, stream=CallbackStream(on_item, STREAM_WINDOW))[0].future)

    def _start(self, method: str, args: Tuple[Any, ...], on_item: Optional[Callable[[Any], None]] = None, quiet: bool = False) -> PendingCall:
        """submit() (submit_stream() given on_item), no deadline, settling a lean CallFuture: for
        a layer whose own futures are what users see (shmhub.executor), no Condition per call.
        quiet: see Connection.want()."""
        conn = self._conn
        conn.check()
        conn.limiter.acquire(0)
        stream: "bool | CallbackStream" = False if on_item is None else CallbackStream(on_item, STREAM_WINDOW)
        return conn.start_call(method, args, {}, 0, stream=stream, lean=True, quiet=quiet)[0]

    def close(self) -> None:
        """Close the link; calls in flight fail with LinkClosed."""
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait(call: PendingCall) -> Any:
    fut = call.future
    if not call.deadline_ns:
        return fut.result()
    rem = (call.deadline_ns - time.monotonic_ns()) / 1e9
    try:
        return fut.result(max(0.0, rem))
    except cf.TimeoutError as e:
        if isinstance(e, DeadlineExceeded) or fut.done():
            raise
        call.conn.expire(call)  # the timer thread may be late: the deadline is the caller's promise
        return fut.result(0)


class Stream:
    """The items of a streamed call, as they come: `for x in s` or `async for x in s`. The
    handler's exception is raised after the items before it; close() (or leaving the loop and
    dropping the stream) cancels the call."""

    def __init__(self, conn: Connection, call: PendingCall) -> None:
        self._conn = conn
        self._call = call
        assert call.stream is not None
        self._st = call.stream

    def _take(self) -> Any:
        """An item (lock held by the caller), or raise StopIteration / the stream's error."""
        st = self._st
        if st.items:
            item = st.items.popleft()
            st.consumed += 1
            return item
        fut = self._call.future
        if fut.done():
            exc = fut.exception() if not fut.cancelled() else cf.CancelledError()
            if exc is not None:
                raise exc
            raise StopIteration
        return _EMPTY

    def _grant(self) -> None:
        """Every half window consumed, let the handler run that much further (outside the lock:
        a send may wait for ring room)."""
        st = self._st
        with st.cond:
            if st.consumed < STREAM_WINDOW // 2 or self._call.future.done():
                return
            n, st.consumed = st.consumed, 0
        try:
            self._conn.send_frame(Kind.CREDIT, self._call.cid, b"", (), arg=n, deadline_for_send=monotonic_deadline(1.0))
        except Exception:
            pass  # the link is gone: the future fails from the reader

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        st = self._st
        while True:
            with st.cond:
                item = self._take()
                if item is not _EMPTY:
                    break
                rem = None if not self._call.deadline_ns else (self._call.deadline_ns - time.monotonic_ns()) / 1e9
                if rem is not None and rem <= 0:
                    self._call.conn.expire(self._call)
                    continue
                st.cond.wait(rem)
        self._grant()
        return item

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        st = self._st
        loop = asyncio.get_running_loop()
        while True:
            with st.cond:
                try:
                    item = self._take()
                except StopIteration:
                    raise StopAsyncIteration from None
                if item is _EMPTY:
                    f: asyncio.Future[None] = loop.create_future()
                    st.waiters.append((loop, f, threading.get_ident()))
            if item is not _EMPTY:
                self._grant()
                return item
            rem = None if not self._call.deadline_ns else (self._call.deadline_ns - time.monotonic_ns()) / 1e9
            try:
                await asyncio.wait_for(f, rem)
            except asyncio.TimeoutError:
                self._call.conn.expire(self._call)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Stop the stream (cancels the call if it still runs); items not taken are dropped now,
        and with them the shared memory they hold."""
        self._call.future.cancel()
        with self._st.cond:
            self._st.items.clear()
        self._st.wake()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._call.future.cancel()
        except Exception:
            pass


class _Empty:
    pass


_EMPTY = _Empty()
