"""The front's ASGI app: each HTTP request becomes one RPC call to the least-loaded worker (plus a
stream for the rest of a response that does not come in one piece, and calls for a request body).

    uvicorn -> Gateway(scope, receive, send)
                 pool.acquire()                    least loaded, <= max_in_flight, else queue / 503
                 call("http", meta, first chunk) ---> worker: the user's app
                 acall("body", chunk) ...          the rest of the request body, in chunks
                 <--- (response meta, chunk, more) the whole response when the app sent it in one piece
                 stream("rest") <--- (chunk, more) ..., END   only when more follows
               send(start), send(body) ...         504 at the deadline, 502 if the worker dies or lies
                 pool.release()                    as soon as the last chunk is sent

Errors of the worker become statuses here, at the edge: nothing a worker sends can crash the front."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from typing import Any, Dict, Optional, Tuple

from ..errors import DeadlineExceeded, HttpProtocolError, LinkError, RpcError, RpcProtocolError
from ._meta import RequestMeta, decode_response, encode_request
from ._pool import QueueFull, Worker, WorkerPool
from ._worker import CHUNK
from .types import Message, Receive, Scope, Send

__all__ = ["Gateway", "request_meta"]

log = logging.getLogger("shmhub.http")
access_log = logging.getLogger("shmhub.http.access")

RETRY_AFTER = b"1"  # seconds a client told 503 should wait


def request_meta(scope: Scope) -> RequestMeta:
    """The metadata of an ASGI http scope."""
    client, server = scope.get("client"), scope.get("server")
    return RequestMeta(
        method=scope["method"],
        path=scope["path"],
        raw_path=scope.get("raw_path") or b"",
        query=scope.get("query_string", b""),
        headers=tuple((bytes(k), bytes(v)) for k, v in scope["headers"]),
        root_path=scope.get("root_path", ""),
        scheme=scope.get("scheme", "http"),
        http_version=scope.get("http_version", "1.1"),
        client=(str(client[0]), int(client[1])) if client else None,
        server=(str(server[0]), int(server[1] or 0)) if server else None,
    )


class _Failed(Exception):
    """The request failed before its response started: answer `status`."""

    def __init__(self, status: int, reason: str, headers: Tuple[Tuple[bytes, bytes], ...] = ()) -> None:
        super().__init__(reason)
        self.status = status
        self.headers = headers


class Gateway:
    """ASGI app of the front. timeout: seconds per request (queue wait included), None for none."""

    def __init__(self, pool: WorkerPool, *, timeout: Optional[float] = 30.0, health_path: str = "/_shmhub/health") -> None:
        self.pool = pool
        self.timeout = timeout
        self.health_path = health_path
        self._ids = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":  # not carried to the workers: refused at the handshake (403)
            await send({"type": "websocket.close", "code": 1003})
        elif kind != "http":
            raise RuntimeError(f"shmhub's gateway carries HTTP only, not {kind!r}")
        elif scope["path"] == self.health_path:
            stats = self.pool.stats()
            await _simple(send, 200 if stats["ready"] else 503, json.dumps(stats).encode(), b"application/json")
        else:
            await self._handle(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    await self.pool.start()
                except Exception as e:
                    await self.pool.close()
                    await send({"type": "lifespan.startup.failed", "message": f"workers did not start: {e}"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await self.pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.monotonic()
        deadline = math.inf if self.timeout is None else t0 + self.timeout
        out = _Counting(send)
        try:
            try:
                w = await self.pool.acquire(deadline)
            except QueueFull as e:
                raise _Failed(503, str(e), ((b"retry-after", RETRY_AFTER),)) from None
            except asyncio.TimeoutError:
                raise _Failed(504, f"no worker had room within {self.timeout} s") from None
            lease = _Lease(self.pool, w)
            try:
                await self._exchange(lease, scope, receive, out, deadline)
            finally:
                lease.release(ok=False)
        except _Failed as f:
            if out.status:  # the response had started: all we can do is cut it
                raise RuntimeError(f"response aborted: {f}") from None
            await _simple(out, f.status, f"{f}\n".encode(), b"text/plain; charset=utf-8", f.headers)
        finally:
            _access(scope, out.status or 500, out.sent, t0)

    async def _exchange(self, lease: "_Lease", scope: Scope, receive: Receive, send: Send, deadline: float) -> None:
        w = lease.worker
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        body, more = msg.get("body", b""), bool(msg.get("more_body", False))
        rid = next(self._ids)
        rem = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
        deadline_ns = 0 if rem is None else time.monotonic_ns() + int(rem * 1e9)
        try:
            meta_in = encode_request(request_meta(scope))
        except HttpProtocolError as e:  # not the worker's fault: the request itself cannot travel
            raise _Failed(400, str(e)) from None
        pump = None
        rest = None
        started = False
        try:

            def start_pump() -> None:  # the worker must know the request before its body chunks
                nonlocal pump
                pump = asyncio.ensure_future(self._pump(w, rid, receive, rem))

            # Cancelling this task cancels the call.
            first = await w.client._acall("http", (rid, meta_in, body, more, deadline_ns), {}, rem, start_pump if more else None)
            meta_bytes, chunk, more = _item(first, 3)
            meta = decode_response(meta_bytes)
            if more:  # a streamed or large response: the rest follows as a stream of chunks
                rest = w.client.stream("rest", rid, timeout=rem)
            started = True
            await send({"type": "http.response.start", "status": meta.status, "headers": list(meta.headers)})
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            del first, chunk  # its shared memory goes back now, not when the whole response is relayed
            if rest is not None:
                await self._relay(rest, send, receive if pump is None else None)
            # The client has it all and may send its next request before anything else arrives:
            # the worker's room counts from now, or it would look busier than it is.
            lease.release(ok=True)
        except DeadlineExceeded:
            if w.interface == "wsgi":  # a sync handler cannot be interrupted: its thread may be stuck
                self.pool.retire(w, f"a WSGI request passed its deadline of {self.timeout} s")
            raise _Failed(504, f"no response within {self.timeout} s") from None
        except RpcProtocolError as e:  # HttpProtocolError included: the worker goes, as a terminal connection would
            log.error("protocol error from worker pid %s: %s", w.pid, e)
            self.pool.retire(w, "protocol error")
            raise _Failed(502, "the worker answered out of protocol") from None
        except (LinkError, RpcError) as e:
            raise _Failed(502, f"worker pid {w.pid} failed: {type(e).__name__}: {e}") from None
        except Exception as e:  # raised in the worker, outside the app (which answers 500 itself)
            if started:  # the client's connection failed mid-response: uvicorn handles that
                raise
            log.error("worker pid %s failed a request: %s: %s", w.pid, type(e).__name__, e)
            raise _Failed(502, f"worker pid {w.pid} failed: {type(e).__name__}") from None
        finally:
            if rest is not None:
                rest.close()
            if pump is not None:
                pump.cancel()

    async def _relay(self, rest: Any, send: Send, receive: Optional[Receive]) -> None:
        """Pass the rest of a response on. uvicorn drops what is sent after the client went away,
        so with the request body read, receive() watches for that: the stream stops at the next
        chunk (and the worker's app is cancelled) instead of running on to its end or deadline."""
        gone = asyncio.ensure_future(receive()) if receive is not None else None
        try:
            more = True
            async for item in rest:
                if gone is not None and gone.done():
                    return
                chunk, more = _item(item, 2)
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if more:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if gone is not None:
                gone.cancel()

    async def _pump(self, w: Worker, rid: int, receive: Receive, timeout: Optional[float]) -> None:
        """Forward the rest of the request body in chunks of about CHUNK bytes: never whole."""
        buf = bytearray()
        more = True
        try:
            while more:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    await w.client.acall("body", rid, None, False, timeout=timeout)
                    return
                buf += msg.get("body", b"")
                more = bool(msg.get("more_body", False))
                if len(buf) >= CHUNK or not more:
                    chunk, buf = buf, bytearray()
                    await w.client.acall("body", rid, chunk, more, timeout=timeout)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the response side reports the failure; this only explains it
            log.debug("request body of %d to worker pid %s: %r", rid, w.pid, e)


class _Lease:
    """A request's place on a worker, given back once (when the response is complete, or failed)."""

    __slots__ = ("pool", "worker", "held")

    def __init__(self, pool: WorkerPool, worker: Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.held = True

    def release(self, ok: bool) -> None:
        if self.held:
            self.held = False
            self.pool.release(self.worker, ok)


def _item(item: Any, n: int) -> Tuple[Any, ...]:
    """A stream item of the expected shape, else HttpProtocolError."""
    if not isinstance(item, tuple) or len(item) != n or not isinstance(item[-1], bool) or not isinstance(item[-2], (bytes, bytearray, memoryview)):
        raise HttpProtocolError(f"malformed response item from the worker: {type(item).__name__} {repr(item)[:80]}")
    if n == 3 and not isinstance(item[0], (bytes, bytearray, memoryview)):
        raise HttpProtocolError("malformed response item from the worker: metadata is not bytes")
    return item


class _Counting:
    """send(), remembering the status and counting body bytes (for the access log)."""

    __slots__ = ("send", "status", "sent")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.status = 0
        self.sent = 0

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.status = int(msg["status"])
        else:
            self.sent += len(msg.get("body", b""))
        await self.send(msg)


async def _simple(send: Send, status: int, body: bytes, ctype: bytes, headers: Tuple[Tuple[bytes, bytes], ...] = ()) -> None:
    hdrs = [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _access(scope: Scope, status: int, size: int, t0: float) -> None:
    """One line in the combined log format (as Apache and nginx write it)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    headers: Dict[bytes, bytes] = {k.lower(): v for k, v in scope.get("headers", ())}
    client = scope.get("client")
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    access_log.info(
        '%s - - [%s] "%s %s HTTP/%s" %d %s "%s" "%s"',
        client[0] if client else "-",
        time.strftime("%d/%b/%Y:%H:%M:%S %z"),
        scope["method"],
        target.decode("latin-1"),
        scope.get("http_version", "1.1"),
        status,
        size or "-",
        headers.get(b"referer", b"-").decode("latin-1"),
        headers.get(b"user-agent", b"-").decode("latin-1"),
    )
