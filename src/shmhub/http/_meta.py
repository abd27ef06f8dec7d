"""HTTP request and response metadata and their compact encoding: a fixed header, then fields as
u32-length-prefixed byte strings. docs/http.md documents it byte by byte (tests/http/test_meta_docs.py
checks it against this module). Pure functions over bytes: no I/O, no clock, no shared memory.
The bodies never travel here: they go as their own chunks (out-of-band buffers of the RPC layer)."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from ..errors import HttpProtocolError
from .types import Address, Headers

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

__all__ = [
    "Kind",
    "Method",
    "RequestMeta",
    "ResponseMeta",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "VERSION",
    "REQUEST_HEADER",
    "RESPONSE_HEADER",
]

VERSION = 1
# u8 version, u8 kind, u8 method, u8 flags, u16 n_headers, u16 n_params, u16 client_port, u16 server_port,
# u8 http_version, u8 reserved, u16 reserved
REQUEST_HEADER = struct.Struct("<BBBBHHHHBBH")
REQUEST_HEADER_SIZE = 16
REQ_OFF_VERSION = 0
REQ_OFF_KIND = 1
REQ_OFF_METHOD = 2
REQ_OFF_FLAGS = 3
REQ_OFF_N_HEADERS = 4
REQ_OFF_N_PARAMS = 6
REQ_OFF_CLIENT_PORT = 8
REQ_OFF_SERVER_PORT = 10
REQ_OFF_HTTP_VERSION = 12
REQ_OFF_RESERVED = 13
REQ_OFF_RESERVED2 = 14
# u8 version, u8 kind, u16 status, u16 n_headers, u16 reserved
RESPONSE_HEADER = struct.Struct("<BBHHH")
RESPONSE_HEADER_SIZE = 8
RESP_OFF_VERSION = 0
RESP_OFF_KIND = 1
RESP_OFF_STATUS = 2
RESP_OFF_N_HEADERS = 4
RESP_OFF_RESERVED = 6
LENGTH = struct.Struct("<I")  # the prefix of every field
LENGTH_SIZE = 4

FLAG_CLIENT = 0x1  # the client address (host field, port in the header) is present
FLAG_SERVER = 0x2  # the server address is present
FLAG_HTTPS = 0x4  # scheme https (else http)
KNOWN_FLAGS = 0x7
MAX_HEADERS = 65535  # n_headers is a u16
MAX_FIELD = 1 << 24  # bytes of one field: more is a protocol error, not an allocation
MAX_METHOD_LEN = 64

assert REQUEST_HEADER.size == REQUEST_HEADER_SIZE and RESPONSE_HEADER.size == RESPONSE_HEADER_SIZE


class Kind(enum.IntEnum):
    """Which metadata a buffer holds."""

    REQUEST = 1
    RESPONSE = 2


class Method(enum.IntEnum):
    """Method codes of the standard methods; any other method travels by name (code NAMED)."""

    NAMED = 0
    GET = 1
    HEAD = 2
    POST = 3
    PUT = 4
    DELETE = 5
    CONNECT = 6
    OPTIONS = 7
    TRACE = 8
    PATCH = 9


HTTP_VERSIONS = ("1.0", "1.1", "2", "3")  # http_version codes 0..3
_METHOD_CODES = {m.name: m for m in Method if m is not Method.NAMED}
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class RequestMeta:
    """Everything of an HTTP request but its body. Headers keep repeats and order (ASGI: lower-case
    byte names). route_pattern and path_params are set by a front that routes; the gateway does not
    (the app routes) and leaves them empty."""

    method: str
    path: str
    raw_path: bytes = b""
    query: bytes = b""
    headers: Headers = ()
    route_pattern: str = ""
    path_params: Tuple[Tuple[str, str], ...] = ()
    root_path: str = ""
    scheme: str = "http"
    http_version: str = "1.1"
    client: Address = None
    server: Address = None


@dataclass(frozen=True)
class ResponseMeta:
    """Status and headers of an HTTP response (repeats kept, in order)."""

    status: int
    headers: Headers = ()

    @property
    def content_type(self) -> Optional[str]:
        """The content-type header, if any."""
        for k, v in self.headers:
            if k.lower() == b"content-type":
                return v.decode("latin-1")
        return None


def _method_code(method: str) -> Tuple[int, Optional[bytes]]:
    code = _METHOD_CODES.get(method)
    if code is not None:
        return int(code), None
    raw = method.encode("latin-1", "replace")
    if not 0 < len(raw) <= MAX_METHOD_LEN or not _TCHAR.issuperset(raw):
        raise HttpProtocolError(f"method {method!r} is not an HTTP token of 1 to {MAX_METHOD_LEN} characters")
    return int(Method.NAMED), raw


def _put(out: List[bytes], fields: List[bytes]) -> None:
    """Append the fields, each length-prefixed (one loop: a call per field was half of encoding)."""
    pack = LENGTH.pack
    for field in fields:
        n = len(field)
        if n > MAX_FIELD:
            raise HttpProtocolError(f"a metadata field of {n} bytes exceeds MAX_FIELD ({MAX_FIELD})")
        out.append(pack(n))
        out.append(field)


def _text(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")  # ASGI paths are percent-decoded: any bytes may appear


def encode_request(meta: RequestMeta) -> bytes:
    """The request metadata as bytes; HttpProtocolError if it cannot be encoded (a method that is
    not a token, too many headers, an oversize field)."""
    code, name = _method_code(meta.method)
    try:
        version = HTTP_VERSIONS.index(meta.http_version)
    except ValueError:
        raise HttpProtocolError(f"unknown HTTP version {meta.http_version!r}") from None
    flags = (FLAG_CLIENT if meta.client else 0) | (FLAG_SERVER if meta.server else 0) | (FLAG_HTTPS if meta.scheme == "https" else 0)
    if max(len(meta.headers), len(meta.path_params)) > MAX_HEADERS:
        raise HttpProtocolError(f"{len(meta.headers)} headers or {len(meta.path_params)} path params exceed MAX_HEADERS ({MAX_HEADERS})")
    out = [
        REQUEST_HEADER.pack(
            VERSION,
            Kind.REQUEST,
            code,
            flags,
            len(meta.headers),
            len(meta.path_params),
            meta.client[1] if meta.client else 0,
            meta.server[1] if meta.server else 0,
            version,
            0,
            0,
        )
    ]
    fields: List[bytes] = [] if name is None else [name]
    fields += (_text(meta.path), meta.raw_path, meta.query, _text(meta.root_path) if meta.root_path else b"")
    fields.append(_text(meta.route_pattern) if meta.route_pattern else b"")
    if meta.client:
        fields.append(_text(meta.client[0]))
    if meta.server:
        fields.append(_text(meta.server[0]))
    for k, v in meta.headers:
        fields += (bytes(k), bytes(v))
    for pk, pv in meta.path_params:
        fields += (_text(pk), _text(pv))
    _put(out, fields)
    return b"".join(out)


def encode_response(meta: ResponseMeta) -> bytes:
    """The response metadata as bytes; HttpProtocolError for a status outside 100..999."""
    if not 100 <= meta.status <= 999:
        raise HttpProtocolError(f"status {meta.status} is outside 100..999")
    if len(meta.headers) > MAX_HEADERS:
        raise HttpProtocolError(f"{len(meta.headers)} headers exceed MAX_HEADERS ({MAX_HEADERS})")
    out = [RESPONSE_HEADER.pack(VERSION, Kind.RESPONSE, meta.status, len(meta.headers), 0)]
    fields: List[bytes] = []
    for k, v in meta.headers:
        fields += (bytes(k), bytes(v))
    _put(out, fields)
    return b"".join(out)


def _header(b: bytes, packer: struct.Struct, kind: Kind) -> Tuple[int, ...]:
    if len(b) < packer.size:
        raise HttpProtocolError(f"{kind.name.lower()} metadata of {len(b)} bytes is shorter than its {packer.size}-byte header")
    fields: Tuple[int, ...] = packer.unpack_from(b, 0)
    if fields[0] != VERSION:
        raise HttpProtocolError(f"{kind.name.lower()} metadata version {fields[0]} (this end speaks {VERSION})")
    if fields[1] != kind:
        raise HttpProtocolError(f"expected {kind.name} metadata, got kind {fields[1]}")
    return fields


def _field(b: bytes, pos: int, what: str) -> Tuple[bytes, int]:
    """The length-prefixed field of b at pos, and the position after it."""
    if pos + LENGTH_SIZE > len(b):
        raise HttpProtocolError(f"{what} metadata truncated at byte {pos} (a field length)")
    (ln,) = LENGTH.unpack_from(b, pos)
    end = pos + LENGTH_SIZE + ln
    if ln > MAX_FIELD or end > len(b):
        raise HttpProtocolError(f"{what} metadata: a field of {ln} bytes at byte {pos} overruns the {len(b)} bytes given")
    return b[pos + LENGTH_SIZE : end], end


def _fields(b: bytes, pos: int, count: int, what: str) -> List[bytes]:
    """`count` length-prefixed fields of b from pos, which must end exactly at its end. (_field's
    checks in one loop: a call per field was a third of a worker's request decoding.)"""
    out: List[bytes] = []
    n = len(b)
    unpack = LENGTH.unpack_from
    for _ in range(count):
        start = pos + LENGTH_SIZE
        if start > n:
            raise HttpProtocolError(f"{what} metadata truncated at byte {pos} (a field length)")
        (ln,) = unpack(b, pos)
        end = start + ln
        if ln > MAX_FIELD or end > n:
            raise HttpProtocolError(f"{what} metadata: a field of {ln} bytes at byte {pos} overruns the {n} bytes given")
        out.append(b[start:end])
        pos = end
    if pos != n:
        raise HttpProtocolError(f"{what} metadata has {n - pos} trailing bytes")
    return out


def _str(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _bytes(data: "Buffer") -> bytes:
    """One copy of a small buffer, then plain slices (a memoryview per field cost 10 µs a request)."""
    return data if type(data) is bytes else bytes(memoryview(data).cast("B"))


def decode_request(data: "Buffer") -> RequestMeta:
    """RequestMeta from bytes; HttpProtocolError for anything malformed."""
    b = _bytes(data)
    _, _, code, flags, n_headers, n_params, cport, sport, version, r1, r2 = _header(b, REQUEST_HEADER, Kind.REQUEST)
    if flags & ~KNOWN_FLAGS:
        raise HttpProtocolError(f"request metadata has unknown flags {flags:#x}")
    if r1 or r2:
        raise HttpProtocolError("request metadata: reserved bytes are not 0")
    if version >= len(HTTP_VERSIONS):
        raise HttpProtocolError(f"request metadata: unknown http_version code {version}")
    named = code == Method.NAMED
    if not named and code not in _CODE_NAMES:
        raise HttpProtocolError(f"request metadata: unknown method code {code}")
    has_client, has_server = bool(flags & FLAG_CLIENT), bool(flags & FLAG_SERVER)
    pos = REQUEST_HEADER_SIZE
    if named:  # checked before the rest is counted: a bad name is the clearer error
        raw, pos = _field(b, pos, "request")
        if not 0 < len(raw) <= MAX_METHOD_LEN or not _TCHAR.issuperset(raw):
            raise HttpProtocolError(f"request metadata: method name {raw[:MAX_METHOD_LEN]!r} is not an HTTP token")
        method = raw.decode("ascii")
    else:
        method = _CODE_NAMES[code]
    f = _fields(b, pos, 5 + has_client + has_server + 2 * (n_headers + n_params), "request")
    path, raw_path, query = _str(f[0]), f[1], f[2]
    root_path = _str(f[3]) if f[3] else ""  # usually empty, as the route: no decode call then
    route = _str(f[4]) if f[4] else ""
    i = 5
    client = server = None
    if has_client:
        client, i = (_str(f[i]), cport), i + 1
    if has_server:
        server, i = (_str(f[i]), sport), i + 1
    it = iter(f[i : i + 2 * n_headers])
    headers = tuple(zip(it, it))
    params: Tuple[Tuple[str, str], ...] = ()
    if n_params:
        it = iter(f[i + 2 * n_headers :])
        params = tuple((_str(k), _str(v)) for k, v in zip(it, it))
    return RequestMeta(
        method, path, raw_path, query, headers, route, params, root_path, "https" if flags & FLAG_HTTPS else "http", HTTP_VERSIONS[version], client, server
    )


def decode_response(data: "Buffer") -> ResponseMeta:
    """ResponseMeta from bytes; HttpProtocolError for anything malformed."""
    b = _bytes(data)
    _, _, status, n_headers, reserved = _header(b, RESPONSE_HEADER, Kind.RESPONSE)
    if reserved:
        raise HttpProtocolError("response metadata: reserved bytes are not 0")
    if not 100 <= status <= 999:
        raise HttpProtocolError(f"response metadata: status {status} is outside 100..999")
    it = iter(_fields(b, RESPONSE_HEADER_SIZE, 2 * n_headers, "response"))
    return ResponseMeta(status, tuple(zip(it, it)))


_CODE_NAMES = {int(m): m.name for m in Method if m is not Method.NAMED}
