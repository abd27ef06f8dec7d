"""The RPC frame: a fixed 32-byte header, then the method name, the out-of-band buffer
descriptors and the codec's payload, in one message; the out-of-band buffers follow as messages
of their own. docs/rpc.md documents it byte by byte (tests/rpc/test_wire_docs.py checks it).

Pure functions over bytes: no I/O, no clock, no shared memory."""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, List, Sequence, Tuple

from ..errors import RpcProtocolError

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

__all__ = [
    "Kind",
    "HEADER",
    "HEADER_SIZE",
    "DESCRIPTOR",
    "DESCRIPTOR_SIZE",
    "VERSION",
    "FLAG_STREAM",
    "MAX_BUFFERS",
    "MAX_METHOD_LEN",
    "encode_frame",
    "decode_frame",
    "Frame",
]

VERSION = 1
# u8 version, u8 kind, u16 flags, u32 n_buffers, u64 call_id, u64 deadline_ns, u32 arg, u16 method_len, u16 reserved
HEADER = struct.Struct("<BBHIQQIHH")
HEADER_SIZE = 32
OFF_VERSION = 0
OFF_KIND = 1
OFF_FLAGS = 2
OFF_N_BUFFERS = 4
OFF_CALL_ID = 8
OFF_DEADLINE_NS = 16
OFF_ARG = 24
OFF_METHOD_LEN = 28
OFF_RESERVED = 30
# Per out-of-band buffer: u64 offset and u64 length of the buffer inside its own message (a buffer
# sent zero-copy from link.empty() starts after the array header of its reserved message).
DESCRIPTOR = struct.Struct("<QQ")
DESCRIPTOR_SIZE = 16
DESC_OFF_OFFSET = 0
DESC_OFF_LENGTH = 8

FLAG_STREAM = 0x1  # REQUEST: the caller iterates the result (ITEM frames, then END)
KNOWN_FLAGS = FLAG_STREAM
MAX_BUFFERS = 4096  # per frame; more is an oversize frame
MAX_METHOD_LEN = 1024

assert HEADER.size == HEADER_SIZE and DESCRIPTOR.size == DESCRIPTOR_SIZE


class Kind(enum.IntEnum):
    """What a frame carries. REQUEST, CANCEL and CREDIT go to the serving end; the others back to the caller."""

    REQUEST = 1  # method, deadline, flags; payload: the arguments
    RESULT = 2  # payload: the return value
    ERROR = 3  # payload: an encoded exception (see _protocol.encode_error)
    CANCEL = 4  # the caller gave up on call_id
    ITEM = 5  # one item of a streamed result
    END = 6  # the stream ended normally
    CREDIT = 7  # the caller consumed items: the server may send `arg` more


_KINDS = {int(k): k for k in Kind}
# Plain module names for the hot paths: each Kind.X lookup costs ~50 ns (an enum class attribute).
K_REQUEST, K_RESULT, K_ERROR, K_CANCEL, K_ITEM, K_END, K_CREDIT = Kind.REQUEST, Kind.RESULT, Kind.ERROR, Kind.CANCEL, Kind.ITEM, Kind.END, Kind.CREDIT


class Frame:
    """A decoded header frame: the fixed header's fields, the descriptors of the buffers that
    follow, and where the codec payload starts in the message (a plain slotted class: one is
    built for every frame)."""

    __slots__ = ("kind", "call_id", "flags", "deadline_ns", "arg", "method", "n_buffers", "descriptors", "payload_offset")

    def __init__(
        self,
        kind: Kind,
        call_id: int,
        flags: int,
        deadline_ns: int,
        arg: int,
        method: str,
        n_buffers: int,
        descriptors: Tuple[Tuple[int, int], ...],
        payload_offset: int,
    ) -> None:
        self.kind = kind
        self.call_id = call_id
        self.flags = flags
        self.deadline_ns = deadline_ns  # absolute CLOCK_MONOTONIC nanoseconds; 0: no deadline
        self.arg = arg  # CREDIT: items granted
        self.method = method
        self.n_buffers = n_buffers
        self.descriptors = descriptors
        self.payload_offset = payload_offset

    def __repr__(self) -> str:
        return (
            f"Frame({self.kind.name}, call_id={self.call_id}, flags={self.flags:#x}, "
            f"deadline_ns={self.deadline_ns}, arg={self.arg}, method={self.method!r}, n_buffers={self.n_buffers})"
        )


_pack = HEADER.pack
_unpack = HEADER.unpack_from


def encode_frame(
    kind: Kind,
    call_id: int,
    payload: "Buffer" = b"",
    *,
    flags: int = 0,
    deadline_ns: int = 0,
    arg: int = 0,
    method: str = "",
    buffers: Sequence[Tuple[int, int]] = (),
) -> bytes:
    """One header message. `buffers`: (offset, length) of each out-of-band buffer, sent after it."""
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    if not buffers and not method:  # responses: the common case, kept short
        return _pack(VERSION, kind, flags, 0, call_id, deadline_ns, arg, 0, 0) + payload
    m = method.encode()
    if len(m) > MAX_METHOD_LEN:
        raise ValueError(f"method name of {len(m)} bytes exceeds {MAX_METHOD_LEN}")
    if not buffers:  # a request without buffers
        return _pack(VERSION, kind, flags, 0, call_id, deadline_ns, arg, len(m), 0) + m + payload
    if len(buffers) > MAX_BUFFERS:
        raise ValueError(f"{len(buffers)} out-of-band buffers exceed {MAX_BUFFERS} per frame")
    parts: List[bytes] = [HEADER.pack(VERSION, kind, flags, len(buffers), call_id, deadline_ns, arg, len(m), 0), m]
    parts.extend(DESCRIPTOR.pack(o, n) for o, n in buffers)
    parts.append(payload)
    return b"".join(parts)


def decode_frame(data: "Buffer", max_frame: int) -> Frame:
    """Parse a header message; RpcProtocolError if it is malformed or larger than max_frame."""
    with memoryview(data) as mv:
        n = mv.nbytes
        if n > max_frame:
            raise RpcProtocolError(f"oversize frame: {n} bytes exceed max_frame {max_frame}")
        if n < HEADER_SIZE:
            raise RpcProtocolError(f"truncated frame: {n} bytes, the header alone is {HEADER_SIZE}")
        version, kind, flags, nbuf, call_id, deadline_ns, arg, mlen, _ = _unpack(mv)
        if version != VERSION:
            raise RpcProtocolError(f"frame of protocol version {version}, this end speaks {VERSION}")
        k = _KINDS.get(kind)
        if k is None:
            raise RpcProtocolError(f"unknown frame kind {kind}")
        if not (flags or nbuf or mlen):  # responses: the common case, kept short
            return Frame(k, call_id, 0, deadline_ns, arg, "", 0, (), HEADER_SIZE)
        if flags & ~KNOWN_FLAGS:
            raise RpcProtocolError(f"unknown frame flags {flags:#x}")
        if nbuf > MAX_BUFFERS:
            raise RpcProtocolError(f"oversize frame: {nbuf} out-of-band buffers, at most {MAX_BUFFERS}")
        if mlen > MAX_METHOD_LEN:
            raise RpcProtocolError(f"oversize frame: method name of {mlen} bytes, at most {MAX_METHOD_LEN}")
        end = HEADER_SIZE + mlen + nbuf * DESCRIPTOR_SIZE
        if end > n:
            raise RpcProtocolError(f"truncated frame: {n} bytes, its header announces {end}")
        try:
            method = str(mv[HEADER_SIZE : HEADER_SIZE + mlen], "utf-8")
        except UnicodeDecodeError:
            raise RpcProtocolError("method name is not UTF-8") from None
        descs = tuple(DESCRIPTOR.unpack_from(mv, HEADER_SIZE + mlen + i * DESCRIPTOR_SIZE) for i in range(nbuf)) if nbuf else ()
    return Frame(k, call_id, flags, deadline_ns, arg, method, nbuf, descs, end)
