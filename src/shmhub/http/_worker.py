"""A worker guest: runs the user's ASGI or WSGI app behind `rpc.serve`, one call per HTTP request,
plus a stream for the rest of a response that does not come in one piece (docs/http.md, "Calls").

    front                                   worker (this module)
    acall("http", rid, meta, body, more)  -> app(scope, receive, send) / app(environ, start_response)
    acall("body", rid, chunk, more)       -> the request body's next chunk (receive() / wsgi.input)
    <- (response meta, chunk, more)          the whole response, in the common case: one round trip
    stream("rest", rid)                   -> only if more: (chunk, more) ..., END

Response chunks larger than CHUNK are sent as slices (memoryviews): each travels through a slot or
a mapping of its own, so no payload is pickled or held in one piece on the way."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import contextvars
import importlib
import inspect
import io
import os
import sys
import threading
import time
import traceback
from collections import deque
from typing import Any, AsyncGenerator, AsyncIterator, Deque, Generator, Dict, Iterator, List, Optional, Set, Tuple, Union

from .. import rpc
from ..errors import HttpProtocolError, ShmTimeout
from ._meta import RequestMeta, ResponseMeta, decode_request, encode_response
from .types import ASGIApp, Message, Scope, WSGIApp

__all__ = ["AsgiWorker", "WsgiWorker", "CHUNK", "detect_interface", "load_app", "main"]

CHUNK = 256 * 1024 - 64  # one slot of the 256 KiB class (less its length prefix and some slack)
WINDOW = 4  # response items an app may run ahead of the stream (which has its own credit window)

Chunk = Union[bytes, bytearray, memoryview]

_running: "Set[asyncio.Task[None]]" = set()


def load_app(ref: str) -> Any:
    """'package.module:attr' (dots in attr reach into it) -> the object."""
    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"app {ref!r} must be MODULE:ATTRIBUTE, e.g. myapp.main:app")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def detect_interface(app: Any) -> str:
    """'asgi' for a coroutine callable of 3 arguments, 'wsgi' for a callable of 2."""
    # an instance's __call__ (or a class's own): inspect looks at the method, not the object
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", app)  # noqa: B004
    if inspect.iscoroutinefunction(call):
        return "asgi"
    try:
        params = [p for p in inspect.signature(call).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        raise ValueError(f"cannot tell whether {app!r} is ASGI or WSGI: pass interface='asgi' or 'wsgi'") from None
    if len(params) == 2:
        return "wsgi"
    if len(params) == 3:
        return "asgi"
    raise ValueError(f"{app!r} takes {len(params)} arguments: neither ASGI (3) nor WSGI (2)")


def _slices(body: Chunk, more: bool) -> Iterator[Tuple[Chunk, bool]]:
    """A body message as chunks of at most CHUNK bytes; only the last keeps the app's more_body."""
    n = len(body)
    if n <= CHUNK:
        yield body, more
        return
    view = memoryview(body)
    for i in range(0, n, CHUNK):
        yield view[i : i + CHUNK], more or i + CHUNK < n


def _scope(meta: RequestMeta) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": meta.http_version,
        "method": meta.method,
        "scheme": meta.scheme,
        "path": meta.path,
        "raw_path": meta.raw_path or None,
        "query_string": meta.query,
        "root_path": meta.root_path,
        "headers": list(meta.headers),  # (name, value) tuples, as uvicorn gives them
        "client": list(meta.client) if meta.client else None,
        "server": list(meta.server) if meta.server else None,
    }
    if meta.route_pattern:
        scope["shmhub.route"] = meta.route_pattern
    if meta.path_params:
        scope["path_params"] = dict(meta.path_params)
    return scope


class _AsgiExchange:
    """One request through an ASGI app, in the serving loop: receive() from the first chunk and the
    body calls, send() into a small queue of response items that next() takes."""

    def __init__(self, app: ASGIApp, meta: RequestMeta, body: Chunk, more: bool) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()  # once: each lookup is a getpid() syscall in 3.11
        self.scope = _scope(meta)
        self.first: Optional[Tuple[Chunk, bool]] = (body, more)
        self.more = more
        self.inbox: "Optional[asyncio.Queue[Tuple[Optional[Chunk], bool]]]" = asyncio.Queue(2) if more else None
        self.out: Deque[Any] = deque()
        # One waiter at a time on each side: a bare future is cheaper than an asyncio.Event.
        self.taker: "Optional[asyncio.Future[None]]" = None  # next() waits for an item (or the end)
        self.sender: "Optional[asyncio.Future[None]]" = None  # send() waits for room in out
        self.over: Optional[asyncio.Event] = None  # made by a receive() that must wait for the end
        self.ended = False  # the response is sent or abandoned: receive() reports a disconnect
        self.start: Optional[ResponseMeta] = None
        self.sent_start = False
        self.done = False
        self.error: Optional[BaseException] = None
        self.task: "Optional[asyncio.Task[None]]" = None

    async def receive(self) -> Message:
        if self.first is not None:
            (body, more), self.first = self.first, None
            return {"type": "http.request", "body": bytes(body), "more_body": more}
        if self.more and self.inbox is not None:
            chunk, self.more = await self.inbox.get()
            if chunk is not None:
                return {"type": "http.request", "body": bytes(chunk), "more_body": self.more}
            self.more = False  # the client went away mid-body
        if not self.ended:
            if self.over is None:
                self.over = asyncio.Event()
            await self.over.wait()
        return {"type": "http.disconnect"}

    async def send(self, msg: Message) -> None:
        kind = msg["type"]
        if kind == "http.response.start":
            if self.start is not None:
                raise RuntimeError("http.response.start sent twice")
            self.start = ResponseMeta(int(msg["status"]), tuple((bytes(k), bytes(v)) for k, v in msg.get("headers", ())))
            return
        if kind != "http.response.body":
            return  # trailers, pathsend and other extensions are not carried
        if self.start is None:
            raise RuntimeError("http.response.body before http.response.start")
        if self.ended:
            raise OSError("the response is already complete or abandoned")
        more = bool(msg.get("more_body", False))
        for chunk, last_more in _slices(msg.get("body", b""), more):
            if not self.sent_start:
                self.sent_start = True
                self.out.append((encode_response(self.start), chunk, last_more))
            else:
                self.out.append((chunk, last_more))
            _wake(self.taker)
            while len(self.out) > WINDOW:
                self.sender = self.loop.create_future()
                await self.sender
        if not more:
            self.end()

    def end(self) -> None:
        """The response is complete or abandoned: a receive() waiting for the end returns."""
        if not self.ended:
            self.ended = True
            if self.over is not None:
                self.over.set()

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception as e:
            self.error = e
            traceback.print_exception(e)  # the app's error goes to the worker's log, as uvicorn does
        finally:
            self.done = True
            _wake(self.taker)

    def begin(self) -> None:
        self.task = task = self.loop.create_task(self.run())
        _running.add(task)  # a task that outlives its response (background work) keeps a reference
        task.add_done_callback(_running.discard)

    async def next(self) -> Any:
        """The next response item; StopAsyncIteration after the last."""
        while not self.out:
            if self.done:
                if self.error is not None and not self.sent_start:
                    self.sent_start = True
                    return (encode_response(ResponseMeta(500, ((b"content-type", b"text/plain; charset=utf-8"),))), b"Internal Server Error", False)
                if self.error is not None:
                    raise self.error
                if not self.sent_start:
                    raise RuntimeError("the ASGI app returned without sending a response")
                raise StopAsyncIteration
            self.taker = self.loop.create_future()
            try:
                await self.taker
            finally:
                self.taker = None
        item = self.out.popleft()
        _wake(self.sender)
        return item

    def abandon(self) -> None:
        """Given up before the response was complete (deadline, client gone): the app is cancelled."""
        if not self.ended:
            self.end()
            if self.task is not None:
                self.task.cancel()

    async def rest(self) -> AsyncGenerator[Any, None]:
        """The items after the first (a stream's `rest` call)."""
        try:
            while True:
                try:
                    item = await self.next()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self.abandon()


def _wake(f: "Optional[asyncio.Future[None]]") -> None:
    if f is not None and not f.done():
        f.set_result(None)


class _Handlers:
    """What both interfaces share: the requests receiving a body (rid -> inbox), the responses
    still streaming (rid -> the rest of their items, fetched by `rest`), and the ping."""

    interface = ""

    def __init__(self) -> None:
        self.inboxes: Dict[int, Any] = {}
        self.pending: Dict[int, Tuple[int, Any]] = {}  # rid -> (deadline_ns, items)
        self.lock = threading.Lock()

    def ping(self) -> Dict[str, Any]:
        return {"interface": self.interface, "pid": os.getpid()}

    def _inbox(self, rid: int) -> Any:
        with self.lock:
            inbox = self.inboxes.get(rid)
        if inbox is None:
            raise HttpProtocolError(f"body chunk for request {rid}, which is not receiving a body here")
        return inbox

    def _park(self, rid: int, deadline_ns: int, items: Any) -> List[Any]:
        """Keep a response's remaining items for `rest`; return those abandoned past their deadline
        (the front gave up between the first item and its `rest` call), for the caller to close."""
        now = time.monotonic_ns()
        with self.lock:
            stale = [r for r, (dl, _) in self.pending.items() if dl and dl < now]
            dropped = [self.pending.pop(r)[1] for r in stale]
            self.pending[rid] = (deadline_ns, items)
        return dropped

    def _unpark(self, rid: int) -> Any:
        with self.lock:
            entry = self.pending.pop(rid, None)
        if entry is None:
            raise HttpProtocolError(f"rest of request {rid}, which has no response pending here")
        return entry[1]

    def _forget(self, rid: int) -> None:
        with self.lock:
            self.inboxes.pop(rid, None)


class AsgiWorker(_Handlers):
    """The handlers of a worker running an ASGI app (all in the server's event loop thread)."""

    interface = "asgi"

    def __init__(self, app: ASGIApp) -> None:
        super().__init__()
        self.app = app

    async def http(self, rid: int, meta: bytes, body: Chunk, more: bool, deadline_ns: int = 0) -> Any:
        """The response's first item; if it says more follows, the rest comes from rest(rid)."""
        ex = _AsgiExchange(self.app, decode_request(meta), body, more)
        if more:
            self.inboxes[rid] = ex  # before any await: the body calls follow this call on the link
        ex.begin()
        try:
            first = await ex.next()
        except BaseException:
            self._forget(rid)
            ex.abandon()  # cancelled (deadline, front gone): so is the app
            raise
        if first[-1]:
            for stale in self._park(rid, deadline_ns, ex.rest()):
                await stale.aclose()
        else:
            self._forget(rid)
            ex.end()  # the response is complete: the app finishes on its own
        return first

    async def rest(self, rid: int) -> AsyncIterator[Any]:
        items = self._unpark(rid)
        try:
            async for item in items:
                yield item
        finally:
            self._forget(rid)
            await items.aclose()

    async def body(self, rid: int, chunk: Optional[Chunk], more: bool) -> None:
        inbox = self._inbox(rid).inbox
        if inbox is not None:
            await inbox.put((chunk, more))  # waits while the app is 2 chunks behind


class _BodyInput(io.RawIOBase):
    """wsgi.input: the first chunk, then chunks as the body calls bring them (at most 2 waiting)."""

    def __init__(self, body: Chunk, more: bool, deadline_ns: int) -> None:
        super().__init__()
        self.chunks: Deque[Optional[Chunk]] = deque([body])
        self.more = more
        self.cond = threading.Condition()
        self.deadline_ns = deadline_ns
        self.room: List[Tuple[asyncio.AbstractEventLoop, "asyncio.Future[None]"]] = []
        self.pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self.pending:
            with self.cond:
                while not self.chunks:
                    if not self.more:
                        return 0
                    rem = None if not self.deadline_ns else (self.deadline_ns - time.monotonic_ns()) / 1e9
                    if rem is not None and rem <= 0:
                        raise ShmTimeout("the request's deadline passed while reading its body")
                    self.cond.wait(rem)
                chunk = self.chunks.popleft()
                waiters, self.room = self.room, []
            for loop, fut in waiters:
                loop.call_soon_threadsafe(_resolve, fut)
            if chunk is None:
                raise ConnectionResetError("the client went away while sending the request body")
            self.pending = memoryview(chunk).cast("B")
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    async def put(self, chunk: Optional[Chunk], more: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self.cond:
                if len(self.chunks) < 2:
                    self.chunks.append(chunk)
                    self.more = more and chunk is not None
                    self.cond.notify_all()
                    return
                fut: "asyncio.Future[None]" = loop.create_future()
                self.room.append((loop, fut))
            await fut


def _resolve(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


def _environ(meta: RequestMeta, body: _BodyInput) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "REQUEST_METHOD": meta.method,
        "SCRIPT_NAME": meta.root_path,
        "PATH_INFO": meta.path.encode("utf-8", "surrogateescape").decode("latin-1"),
        "QUERY_STRING": meta.query.decode("latin-1"),
        "SERVER_PROTOCOL": f"HTTP/{meta.http_version}",
        "SERVER_NAME": meta.server[0] if meta.server else "localhost",
        "SERVER_PORT": str(meta.server[1]) if meta.server else "80",
        "REMOTE_ADDR": meta.client[0] if meta.client else "",
        "REMOTE_PORT": str(meta.client[1]) if meta.client else "",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": meta.scheme,
        "wsgi.input": io.BufferedReader(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,  # our input ends with the body: a chunked upload needs no length
    }
    for k, v in meta.headers:
        name = k.decode("latin-1").upper().replace("-", "_")
        value = v.decode("latin-1")
        key = name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name
        env[key] = f"{env[key]},{value}" if key in env else value  # repeats joined, as PEP 3333 says
    return env


class WsgiWorker(_Handlers):
    """The handlers of a worker running a WSGI app: each request in a thread of the server's pool."""

    interface = "wsgi"

    def __init__(self, app: WSGIApp, max_in_flight: int = 32) -> None:
        super().__init__()
        self.app = app
        self.threads = cf.ThreadPoolExecutor(max_in_flight, thread_name_prefix="shmhub-wsgi")

    async def http(self, rid: int, meta: bytes, body: Chunk, more: bool, deadline_ns: int = 0) -> Any:
        """The response's first item; if it says more follows, the rest comes from rest(rid).
        Registered here, in the loop thread, so the body calls (also run there, in frame order)
        find the request; the app then runs in a thread (which rpc.cancelled() still reaches)."""
        inp = _BodyInput(body, more, deadline_ns)
        if more:
            with self.lock:
                self.inboxes[rid] = inp
        ctx = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.threads, ctx.run, self._first, rid, meta, inp, deadline_ns)

    def _first(self, rid: int, meta: bytes, inp: "_BodyInput", deadline_ns: int) -> Any:
        items = self._run(decode_request(meta), inp)
        try:
            first = next(items)
        except Exception:
            self._forget(rid)
            traceback.print_exc()  # as a WSGI server does: the app's error goes to its log
            return (encode_response(ResponseMeta(500, ((b"content-type", b"text/plain; charset=utf-8"),))), b"Internal Server Error", False)
        except BaseException:
            self._forget(rid)
            raise
        if first[-1]:
            for stale in self._park(rid, deadline_ns, items):
                stale.close()
        else:
            self._forget(rid)
            items.close()
        return first

    def rest(self, rid: int) -> Iterator[Any]:
        items = self._unpark(rid)
        try:
            yield from items
        finally:
            self._forget(rid)
            items.close()

    def _run(self, meta: RequestMeta, inp: _BodyInput) -> Generator[Any, None, None]:
        started: List[ResponseMeta] = []
        written: List[bytes] = []

        def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Any:
            code = int(status.split(" ", 1)[0])
            started[:] = [ResponseMeta(code, tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers))]
            return written.append

        result = self.app(_environ(meta, inp), start_response)
        sent = False
        try:
            pending: Optional[bytes] = None
            for data in result:
                if written:
                    data = b"".join(written) + data
                    written.clear()
                if not data:
                    continue
                if pending is not None:  # one chunk behind: the last one goes out with more=False
                    for chunk, more in _slices(pending, True):
                        yield (encode_response(started[0]), chunk, more) if not sent else (chunk, more)
                        sent = True
                pending = data
            if not started:
                raise RuntimeError("the WSGI app returned without calling start_response")
            tail = (pending if pending is not None else b"") + b"".join(written)
            for chunk, more in _slices(tail, False):
                yield (encode_response(started[0]), chunk, more) if not sent else (chunk, more)
                sent = True
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()

    async def body(self, rid: int, chunk: Optional[Chunk], more: bool) -> None:
        await self._inbox(rid).put(chunk, more)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of a worker process spawned by the front (`python -m shmhub.http`)."""
    import shmhub

    p = argparse.ArgumentParser(prog="python -m shmhub.http")
    p.add_argument("app")
    p.add_argument("--interface", choices=("auto", "asgi", "wsgi"), default="auto")
    p.add_argument("--max-in-flight", type=int, default=32)
    p.add_argument("--switch-interval", type=float, default=None)
    args = p.parse_args(argv)
    if args.switch_interval is not None:
        # The loop (every request's I/O) waits up to this long for the GIL from a handler thread.
        sys.setswitchinterval(args.switch_interval)
    sys.path.insert(0, os.getcwd())  # MODULE:APP is found as `python -m` would find it
    app = load_app(args.app)
    interface = detect_interface(app) if args.interface == "auto" else args.interface
    handlers: Union[AsgiWorker, WsgiWorker] = AsgiWorker(app) if interface == "asgi" else WsgiWorker(app, args.max_in_flight)
    link = shmhub.connect()
    try:
        # The loop that runs the app reads the link too: a request reaches the app's task with no
        # thread hand-off (WSGI apps run in the server's thread pool).
        asyncio.run(rpc.aserve(link, handlers, max_concurrency=args.max_in_flight))
    finally:
        link.close()
