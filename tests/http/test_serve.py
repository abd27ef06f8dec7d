"""A real HTTP client (httpx) against a real `shmhub serve` on 127.0.0.1: methods, headers, query
strings, path params, bodies both ways (empty and large), streaming, load-aware dispatch."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from typing import Any, Dict

import httpx
import pytest

from serverutil import Server

BIG = 24 << 20  # large enough for the mmap tier and many chunks, small enough for a fast suite
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"]


@pytest.fixture(scope="module", params=["star", "flask_server"])
def server(request: pytest.FixtureRequest) -> Server:
    s: Server = request.getfixturevalue(request.param)
    return s


def echo(r: httpx.Response) -> Dict[str, Any]:
    assert r.status_code == 200, r.text
    return json.loads(r.content)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_reaches_the_app_exactly(server, method):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        got = echo(c.request(method, "/echo", content=b"x" if method in ("POST", "PUT", "PATCH") else None))
    assert got["method"] == method


def test_an_unknown_method_travels_by_name_not_as_get():
    """PURGE (above) is outside the method table; BREW is unknown even to llhttp, so this server
    runs uvicorn's h11 parser, which accepts any method token."""
    with Server.cli("apps.star:app", "--workers", "1", "--http", "h11") as s:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            got = echo(c.request("BREW", "/echo", content=b"coffee"))
            assert got["method"] == "BREW" and got["body_len"] == 6
            assert echo(c.request("BREW", "/echo"))["body_len"] == 0


def test_workers_take_the_switch_interval_given(star):
    with httpx.Client(base_url=star.url, timeout=10) as c:
        assert float(c.get("/switch").text) == 0.005  # Python's own
    with Server.cli("apps.star:app", "--workers", "1", "--switch-interval", "0.0005") as s:
        with httpx.Client(base_url=s.url, timeout=10) as c:
            assert float(c.get("/switch").text) == 0.0005


def test_head_has_headers_and_no_body(star):
    with httpx.Client(base_url=star.url, timeout=10) as c:
        r = c.head("/blob/1000")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "1000"


def test_repeated_headers_query_strings_and_path_params(server):
    headers = [("x-tag", "one"), ("x-tag", "two"), ("x-other", "3"), ("x-tag", "three")]
    with httpx.Client(base_url=server.url, timeout=10) as c:
        got = echo(c.get("/items/42/tags/blue?a=1&b=x+y&a=2", headers=headers))
    assert got["path"] == "/items/42/tags/blue"
    assert got["params"] == {"item_id": 42, "tag": "blue"}
    assert got["query"] == "a=1&b=x+y&a=2"
    assert sorted(tuple(kv) for kv in got["query_items"]) == [("a", "1"), ("a", "2"), ("b", "x y")]
    tags = [v for k, v in got["headers"] if k == "x-tag"]
    # WSGI joins repeated headers into one (PEP 3333); ASGI keeps each, in order.
    assert tags in (["one", "two", "three"], ["one,two,three"])
    assert ("x-other", "3") in [tuple(kv) for kv in got["headers"]]


def test_repeated_response_headers_are_kept(star):
    with httpx.Client(base_url=star.url, timeout=10) as c:
        r = c.get("/blob/10")
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers["content-type"] == "application/octet-stream"


def test_empty_body(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        got = echo(c.post("/echo", content=b""))
        blob = c.get("/blob/0")
    assert got["body_len"] == 0 and got["body_sha256"] == hashlib.sha256(b"").hexdigest()
    assert blob.status_code == 200 and blob.content == b""


def test_large_request_body_streams_to_the_app(server):
    body = bytes(range(251)) * (BIG // 251)

    def chunks():  # a chunked upload: the front never learns the size in advance
        for i in range(0, len(body), 1 << 20):
            yield body[i : i + (1 << 20)]

    with httpx.Client(base_url=server.url, timeout=30) as c:
        got = echo(c.post("/echo", content=body))
        streamed = echo(c.post("/echo", content=chunks()))
    for g in (got, streamed):
        assert g["body_len"] == len(body)
        assert g["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_large_response_body(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        r = c.get(f"/blob/{BIG}")
    assert r.status_code == 200 and len(r.content) == BIG
    assert r.content == (bytes(range(256)) * (BIG // 256 + 1))[:BIG]


def test_many_concurrent_large_responses_all_complete(star):
    """32 clients at once, each fetching 1 MiB responses (5 chunks through the pool's 256 KiB class,
    more than it holds at once): every response completes. The serving loop once replied with
    blocking sends and stopped reading while one waited for a slot, which hung a run like this."""
    import asyncio

    n = 1 << 20
    want = (bytes(range(256)) * (n // 256 + 1))[:n]

    async def client(c: httpx.AsyncClient) -> int:
        done = 0
        for _ in range(6):
            r = await c.get(f"/blob/{n}")
            assert r.status_code == 200 and r.content == want
            done += 1
        return done

    async def main() -> list:
        limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
        async with httpx.AsyncClient(base_url=star.url, timeout=30, limits=limits) as c:
            return await asyncio.gather(*(client(c) for _ in range(32)))

    assert asyncio.run(main()) == [6] * 32


def test_streaming_response_arrives_in_pieces(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        with c.stream("GET", "/count", params={"n": 20}) as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers  # streamed: chunked transfer encoding
            text = b"".join(r.iter_raw()).decode()
    assert text == "".join(f"{i}\n" for i in range(20))


def test_health_lists_the_live_workers(star):
    h = star.health()
    assert h["ready"] is True
    assert len([w for w in h["workers"] if not w["retiring"]]) == 2
    assert all(w["interface"] == "asgi" for w in h["workers"])


def test_a_busy_worker_gets_no_new_request_while_another_is_idle(star):
    """Least-loaded dispatch: with one worker busy on a slow request, quick ones go to the other."""
    with httpx.Client(base_url=star.url, timeout=10) as c:
        slow: Dict[str, Any] = {}
        t = threading.Thread(target=lambda: slow.update(r=c.get("/sleep", params={"s": 2.0})))
        t.start()
        try:
            star.wait_health(lambda h: sum(w["in_flight"] for w in h["workers"]) == 1)
            busy = [w["pid"] for w in star.health()["workers"] if w["in_flight"] == 1]
            pids = {int(c.get("/pid").text) for _ in range(10)}
        finally:
            t.join(10)
    assert slow["r"].status_code == 200 and int(slow["r"].text) == busy[0]
    assert busy[0] not in pids and len(pids) == 1


def test_an_app_error_is_a_500_and_the_worker_serves_on(server):
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.get("/boom").status_code == 500
        assert c.get("/pid").status_code == 200


def test_a_websocket_handshake_is_refused_not_crashed(star):
    host, port = star.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert s.recv(4096).startswith(b"HTTP/1.1 403")
    assert httpx.get(star.url + "/", timeout=10).status_code == 200


def test_a_client_leaving_a_streamed_response_stops_it_in_the_worker(star):
    with httpx.Client(base_url=star.url, timeout=10) as c:
        with c.stream("GET", "/count", params={"n": 100000}) as r:  # 1000 s of lines, 10 ms apart
            lines = r.iter_lines()
            assert [next(lines) for _ in range(3)] == ["0", "1", "2"]
    star.wait_health(lambda h: sum(w["in_flight"] for w in h["workers"]) == 0, timeout=5)
