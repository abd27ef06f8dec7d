"""`shmhub serve`: uvicorn in the front process with the gateway as its app, N worker guests.
SIGHUP starts a new generation of workers and drains the old; SIGTERM / SIGINT drain and exit
(uvicorn's own graceful shutdown, then the pool's)."""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import socket
import sys
from typing import Optional, Sequence

from ._gateway import Gateway
from ._pool import WorkerPool, worker_command
from .types import Message, Receive, Scope, Send

__all__ = ["listen", "parse_bind", "serve"]

log = logging.getLogger("shmhub.http")


def parse_bind(bind: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 in brackets) -> (host, port); ValueError if malformed."""
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--bind {bind!r} must be HOST:PORT, e.g. 127.0.0.1:8000")
    return host.strip("[]") or "0.0.0.0", int(port)


class _Front:
    """The gateway, plus SIGHUP -> reload and a log line once the workers are ready."""

    def __init__(self, gateway: Gateway, sock: socket.socket) -> None:
        self.gateway = gateway
        self.sock = sock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            return await self.gateway(scope, receive, send)

        async def sent(msg: Message) -> None:
            if msg["type"] == "lifespan.startup.complete":
                self._started()
            await send(msg)

        await self.gateway(scope, receive, sent)

    def _started(self) -> None:
        pool = self.gateway.pool
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(pool.reload()))
        except (RuntimeError, ValueError):
            pass  # not the main thread: reload through pool.reload() only
        host, port = self.sock.getsockname()[:2]
        log.warning("shmhub serve: http://%s:%d with %d workers (pids %s)", host, port, pool.size, " ".join(str(w.pid) for w in pool.workers))


def listen(host: str, port: int) -> socket.socket:
    """The front's listening socket. Made with proto IPPROTO_TCP: asyncio's own loop sets
    TCP_NODELAY only on sockets that say so, and without it a response written in two parts
    waits for the client's delayed ACK (40 ms a request where uvloop is not installed)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except BaseException:
        sock.close()
        raise
    return sock


def serve(
    app: str,
    *,
    workers: int = 2,
    bind: str = "127.0.0.1:8000",
    timeout: Optional[float] = 30.0,
    max_in_flight: int = 32,
    queue: int = 1024,
    interface: str = "auto",
    http: str = "auto",
    worker_argv: Optional[Sequence[str]] = None,
    log_level: str = "info",
    switch_interval: Optional[float] = None,
) -> None:
    """Serve the ASGI or WSGI app `app` ('module:attribute') with `workers` worker guests behind
    uvicorn on `bind`, until SIGTERM or SIGINT. http: uvicorn's parser ("auto" is httptools when
    installed: fastest, but it rejects methods llhttp does not know; "h11" accepts any token).
    switch_interval: the workers' sys.setswitchinterval() (None: Python's 5 ms); shorter lets
    a worker's event loop take the GIL sooner from sync handlers running CPU-bound code in threads
    (docs/http.md measures the trade). worker_argv replaces the worker command (tests)."""
    import uvicorn

    if switch_interval is not None and not 0 < switch_interval <= 1:
        raise ValueError(f"switch_interval {switch_interval!r} must be in (0, 1] seconds")
    if interface not in ("auto", "asgi", "wsgi"):
        raise ValueError(f"interface {interface!r} must be auto, asgi or wsgi")
    host, port = parse_bind(bind)
    command = list(worker_argv) if worker_argv is not None else worker_command(app, interface, max_in_flight, switch_interval)
    pool = WorkerPool(command, workers, max_in_flight=max_in_flight, queue=queue)
    sock = listen(host, port)
    try:
        logging.basicConfig(level=log_level.upper(), format="%(message)s", stream=sys.stderr)
        config = uvicorn.Config(
            _Front(Gateway(pool, timeout=timeout), sock),
            lifespan="on",
            access_log=False,
            log_level=log_level,
            server_header=False,
            http=http,
            timeout_graceful_shutdown=None if timeout is None else max(1, math.ceil(timeout)),
        )
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
