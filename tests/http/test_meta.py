"""The pure metadata encoding, with bytes: round trips, exact layouts, and every malformed input
raising HttpProtocolError (never another exception, never a hang)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmhub
from shmhub import errors, http
from shmhub.http import _meta as M
from shmhub.http import HttpProtocolError, Method, RequestMeta, ResponseMeta, decode_request, decode_response, encode_request, encode_response

FULL = RequestMeta(
    method="PATCH",
    path="/items/42/é",
    raw_path=b"/items/42/%C3%A9",
    query=b"a=1&a=2&b",
    headers=((b"host", b"h"), (b"x-a", b"1"), (b"x-a", b"2"), (b"cookie", b"")),
    route_pattern="/items/{id}/{name}",
    path_params=(("id", "42"), ("name", "é")),
    root_path="/api",
    scheme="https",
    http_version="2",
    client=("10.0.0.1", 51234),
    server=("::1", 443),
)


def test_a_full_request_round_trips():
    assert decode_request(encode_request(FULL)) == FULL


@pytest.mark.parametrize("method", [m.name for m in Method if m is not Method.NAMED])
def test_standard_methods_travel_as_one_byte(method):
    data = encode_request(RequestMeta(method, "/"))
    assert data[M.REQ_OFF_METHOD] == Method[method]
    assert decode_request(data).method == method


@pytest.mark.parametrize("method", ["PURGE", "BREW", "M-SEARCH", "get", "PROPFIND", "X" * M.MAX_METHOD_LEN])
def test_other_methods_travel_by_name_never_as_get(method):
    data = encode_request(RequestMeta(method, "/"))
    assert data[M.REQ_OFF_METHOD] == Method.NAMED
    assert data[M.REQUEST_HEADER_SIZE : M.REQUEST_HEADER_SIZE + 4] == struct.pack("<I", len(method))
    assert decode_request(data).method == method


@pytest.mark.parametrize("method", ["", "GE T", "GET\r\n", "X" * (M.MAX_METHOD_LEN + 1), "MÉTHODE"])
def test_a_method_that_is_not_a_token_cannot_be_encoded(method):
    with pytest.raises(HttpProtocolError, match="token"):
        encode_request(RequestMeta(method, "/"))


def test_the_request_header_bytes():
    data = encode_request(FULL)
    assert data[: M.REQUEST_HEADER_SIZE] == struct.pack("<BBBBHHHHBBH", 1, 1, Method.PATCH, 0x7, 4, 2, 51234, 443, 2, 0, 0)


def test_the_response_bytes_keep_repeated_headers_in_order():
    meta = ResponseMeta(404, ((b"set-cookie", b"a=1"), (b"content-type", b"text/html"), (b"set-cookie", b"b=2")))
    data = encode_response(meta)
    assert data[:8] == bytes([1, 2]) + struct.pack("<HHH", 404, 3, 0)
    assert data[8:] == b"".join(struct.pack("<I", len(f)) + f for kv in meta.headers for f in kv)
    back = decode_response(data)
    assert back == meta and back.content_type == "text/html"
    assert ResponseMeta(204).content_type is None


@pytest.mark.parametrize("status", [0, 99, 1000, 65535])
def test_a_status_outside_100_999_is_refused_both_ways(status):
    with pytest.raises(HttpProtocolError):
        encode_response(ResponseMeta(status))
    with pytest.raises(HttpProtocolError, match="status"):
        decode_response(struct.pack("<BBHHH", 1, 2, status, 0, 0))


def test_every_truncation_is_a_protocol_error():
    for data, decode in ((encode_request(FULL), decode_request), (encode_response(ResponseMeta(200, ((b"a", b"b"),))), decode_response)):
        for n in range(len(data)):
            with pytest.raises(HttpProtocolError):
                decode(data[:n])


def _patched(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    b[off] = value
    return bytes(b)


REQ = encode_request(RequestMeta("GET", "/", headers=((b"a", b"b"),)))


@pytest.mark.parametrize(
    "data, match",
    [
        (_patched(REQ, M.REQ_OFF_VERSION, 2), "version 2"),
        (_patched(REQ, M.REQ_OFF_KIND, 2), "expected REQUEST"),
        (_patched(REQ, M.REQ_OFF_METHOD, 10), "unknown method code 10"),
        (_patched(REQ, M.REQ_OFF_FLAGS, 0x8), "unknown flags"),
        (_patched(REQ, M.REQ_OFF_HTTP_VERSION, 4), "http_version"),
        (_patched(REQ, M.REQ_OFF_RESERVED, 1), "reserved"),
        (_patched(REQ, M.REQ_OFF_RESERVED2 + 1, 1), "reserved"),
        (_patched(REQ, M.REQ_OFF_N_HEADERS, 2), "overruns|truncated"),
        (REQ + b"\0", "trailing"),
        (REQ[: M.REQUEST_HEADER_SIZE] + struct.pack("<I", 0xFFFFFFFF) + REQ[M.REQUEST_HEADER_SIZE + 4 :], "overruns"),
        (_patched(REQ, M.REQ_OFF_METHOD, 0), "token"),  # the path "/" read as a method name
        (encode_response(ResponseMeta(200, ((b"a", b"b"),))), "expected REQUEST"),
        (b"", "shorter"),
    ],
)
def test_malformed_request_metadata(data, match):
    with pytest.raises(HttpProtocolError, match=match):
        decode_request(data)


def test_malformed_response_metadata():
    ok = encode_response(ResponseMeta(200))
    for data, match in (
        (_patched(ok, 0, 9), "version"),
        (_patched(ok, 1, 1), "expected RESPONSE"),
        (_patched(ok, 6, 1), "reserved"),
        (ok + b"x", "trailing"),
        (REQ, "expected RESPONSE"),
    ):
        with pytest.raises(HttpProtocolError, match=match):
            decode_response(data)


def test_limits_are_enforced_when_encoding():
    with pytest.raises(HttpProtocolError, match="MAX_HEADERS"):
        encode_request(RequestMeta("GET", "/", headers=((b"a", b"b"),) * (M.MAX_HEADERS + 1)))
    with pytest.raises(HttpProtocolError, match="HTTP version"):
        encode_request(RequestMeta("GET", "/", http_version="0.9"))


def test_the_error_is_typed_under_the_hierarchy():
    assert issubclass(HttpProtocolError, errors.HttpError) and issubclass(HttpProtocolError, errors.RpcProtocolError)
    assert issubclass(errors.HttpError, shmhub.ShmhubError)
    assert "HttpProtocolError" in shmhub.__all__ and "HttpError" in shmhub.__all__


def test_public_surface_is_pinned():
    assert http.__all__ == sorted(http.__all__)
    assert http.__all__ == [
        "Gateway",
        "HttpError",
        "HttpProtocolError",
        "Method",
        "QueueFull",
        "RequestMeta",
        "ResponseMeta",
        "Worker",
        "WorkerPool",
        "decode_request",
        "decode_response",
        "encode_request",
        "encode_response",
        "request_meta",
        "serve",
        "worker_command",
    ]


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
raw = st.binary(max_size=20)
pairs = st.lists(st.tuples(raw, raw), max_size=5).map(tuple)
addr = st.one_of(st.none(), st.tuples(text, st.integers(0, 65535)))


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PURGE", "X-Y"]),
    path=text,
    raw_path=raw,
    query=raw,
    headers=pairs,
    route=text,
    params=st.lists(st.tuples(text, text), max_size=3).map(tuple),
    client=addr,
    server=addr,
    https=st.booleans(),
    version=st.sampled_from(M.HTTP_VERSIONS),
)
def test_any_request_round_trips(method, path, raw_path, query, headers, route, params, client, server, https, version):
    meta = RequestMeta(method, path, raw_path, query, headers, route, params, "", "https" if https else "http", version, client, server)
    assert decode_request(encode_request(meta)) == meta


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_decode_or_raise_the_typed_error(data):
    for decode in (decode_request, decode_response):
        try:
            decode(data)
        except HttpProtocolError:
            pass
