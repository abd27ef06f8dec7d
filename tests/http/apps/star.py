"""The Starlette example app of the HTTP tests (and the benchmark)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route


async def hello(request: Request) -> Response:
    return JSONResponse({"hello": "world"})


async def echo(request: Request) -> Response:
    """What the app saw: method, path, query, params, headers with repeats, and the body's digest."""
    h = hashlib.sha256()
    n = 0
    async for chunk in request.stream():
        h.update(chunk)
        n += len(chunk)
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "query_items": list(request.query_params.multi_items()),
            "params": request.path_params,
            "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
            "body_len": n,
            "body_sha256": h.hexdigest(),
            "pid": os.getpid(),
        }
    )


async def blob(request: Request) -> Response:
    """n bytes of a deterministic pattern (headers repeat: two set-cookie)."""
    n = int(request.path_params["n"])
    body = (bytes(range(256)) * (n // 256 + 1))[:n]
    resp = Response(body, media_type="application/octet-stream")
    resp.raw_headers.append((b"set-cookie", b"a=1"))
    resp.raw_headers.append((b"set-cookie", b"b=2"))
    return resp


async def count(request: Request) -> Response:
    n = int(request.query_params.get("n", "5"))

    async def gen() -> AsyncIterator[bytes]:
        for i in range(n):
            yield f"{i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(gen(), media_type="text/plain")


async def sleep(request: Request) -> Response:
    s = float(request.query_params.get("s", "1"))
    mark = request.query_params.get("mark")
    try:
        await asyncio.sleep(s)
    except asyncio.CancelledError:
        if mark:  # the test checks that a request past its deadline is cancelled in the worker
            with open(mark, "w") as f:
                f.write("cancelled")
        raise
    return PlainTextResponse(str(os.getpid()))


def work(n: int) -> int:
    """n turns of a Python loop: a fixed amount of CPU, however the threads share the GIL."""
    x = 0
    for i in range(n):
        x += i & 7
    return x


def _spin(q: Any) -> int:
    """?n=N: N turns of work(); else ?ms=M: M ms of wall-clock time (of the GIL shared with other threads)."""
    if "n" in q:
        return work(int(q["n"]))
    end = time.perf_counter() + float(q.get("ms", "5")) / 1000
    x = 0
    while time.perf_counter() < end:
        x += 1
    return x


def cpu(request: Request) -> Response:
    """CPU in Starlette's thread pool (a sync endpoint)."""
    return JSONResponse({"spins": _spin(request.query_params)})


async def cpu_block(request: Request) -> Response:
    """CPU on the event loop itself: every request of this process waits meanwhile."""
    return JSONResponse({"spins": _spin(request.query_params)})


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


async def pid(request: Request) -> Response:
    return PlainTextResponse(str(os.getpid()))


async def switch(request: Request) -> Response:
    return PlainTextResponse(repr(sys.getswitchinterval()))


app = Starlette(
    routes=[
        Route("/", hello),
        Route("/items/{item_id:int}/tags/{tag}", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE"]),
        Route("/echo", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PURGE", "BREW"]),
        Route("/blob/{n:int}", blob),
        Route("/count", count),
        Route("/sleep", sleep),
        Route("/cpu", cpu),
        Route("/cpu_block", cpu_block),
        Route("/pid", pid),
        Route("/switch", switch),
        Route("/boom", boom),
    ]
)
