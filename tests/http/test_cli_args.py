"""`shmhub serve` refuses bad arguments with a clear message."""

from __future__ import annotations

import os

import pytest

from shmhub import cli
from shmhub.http import WorkerPool
from shmhub.http._serve import listen, parse_bind
from shmhub.http._worker import detect_interface, load_app


@pytest.mark.parametrize("bind", ["8000", "host:", "host:port", "h:70000", ""])
def test_a_malformed_bind_is_refused(bind, capsys):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind(bind)
    assert cli.main(["serve", "apps.star:app", "--bind", bind]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "2"])
def test_a_switch_interval_out_of_range_is_refused(value, capsys):
    assert cli.main(["serve", "apps.star:app", "--switch-interval", value]) == 2
    assert "switch_interval" in capsys.readouterr().err


def test_bind_forms():
    assert parse_bind("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    assert parse_bind(":80") == ("0.0.0.0", 80)


def test_the_front_socket_gets_tcp_nodelay_from_asyncio_itself():
    # Without uvloop uvicorn runs on asyncio's loop, which sets TCP_NODELAY only on IPPROTO_TCP
    # sockets: without it each response waited for the client's delayed ACK (40 ms).
    import asyncio
    import socket

    async def main() -> int:
        got: "asyncio.Future[int]" = asyncio.get_running_loop().create_future()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            got.set_result(w.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            w.close()

        sock = listen("127.0.0.1", 0)
        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            r, w = await asyncio.open_connection(*sock.getsockname())
            try:
                return await asyncio.wait_for(got, 10)
            finally:
                w.close()

    assert asyncio.run(main()) != 0


def test_pool_arguments_are_checked():
    for kw in ({"workers": 0}, {"workers": 1, "max_in_flight": 0}, {"workers": 1, "queue": -1}):
        with pytest.raises(ValueError):
            WorkerPool(["true"], **kw)  # type: ignore[arg-type]


def test_interface_detection_and_app_loading():
    async def asgi(scope, receive, send): ...

    def wsgi(environ, start_response): ...

    class AsgiObj:
        async def __call__(self, scope, receive, send): ...

    assert detect_interface(asgi) == "asgi" and detect_interface(AsgiObj()) == "asgi"
    assert detect_interface(wsgi) == "wsgi"
    with pytest.raises(ValueError, match="neither ASGI"):
        detect_interface(lambda: None)
    assert load_app("os.path:join") is os.path.join
    with pytest.raises(ValueError, match="MODULE:ATTRIBUTE"):
        load_app("os.path")
