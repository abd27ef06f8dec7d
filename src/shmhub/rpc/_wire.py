"""The RPC frame: a fixed 32-byte header, then the method name, the out-of-band buffer
descriptors and the codec's payload, in one message; the out-of-band buffers follow as messages
of their own. docs/rpc.md documents it byte by byte (tests/rpc/test_wire_docs.py checks it).

Pure functions over bytes: no I/O, no clock, no shared memory."""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, Sequence, Tuple

from .. import _native

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
    "encode_header",
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


# The header is parsed and built in the compiled core (one allocation, no struct round trips):
# Python's version of both was a quarter of a null call. The layout above is its specification
# (tests/rpc/test_protocol.py checks the two against each other).
_native.rpc_wire_setup(tuple(_KINDS.get(i) for i in range(256)), VERSION, KNOWN_FLAGS, MAX_BUFFERS, MAX_METHOD_LEN)

Frame = _native.RpcFrame
"""A decoded header frame: kind, call_id, flags, deadline_ns, arg, method, n_buffers, descriptors
((offset, length) of each buffer that follows) and payload_offset (where the codec payload starts)."""

encode_header = _native.rpc_encode
"""encode_header(kind, call_id, payload, flags, deadline_ns, arg, method, buffers): encode_frame()
with every argument positional (the hot paths)."""

decode_frame = _native.rpc_decode
"""decode_frame(data, max_frame) -> Frame: parse a header message (any buffer); RpcProtocolError
if it is malformed or larger than max_frame."""


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
    return encode_header(kind, call_id, payload, flags, deadline_ns, arg, method, buffers)
