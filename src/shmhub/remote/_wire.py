"""The control messages of a remote link (docs/remote.md, "Wire format"), pure: no sockets.

A ZeroMQ message of one part is a payload, sent as it is (no header). A message of two parts
whose first part is empty is a control message; its second part is

    offset  size  field
    0       4     magic b"SHMR"
    4       1     version (1)
    5       1     kind: 1 HELLO, 2 WELCOME, 3 BYE, 4 REFUSE
    6       ...   body of the kind

    HELLO    u32 pid (little-endian), then the guest's name in UTF-8 (the rest)
    WELCOME  u16 port (little-endian) of the guest's own connection on the listener's address
    BYE      empty: the sender closed its end; nothing follows
    REFUSE   the reason in UTF-8 (the rest)
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Union

from ..errors import LinkCorrupted

__all__ = ["Kind", "Control", "MAGIC", "VERSION", "encode", "decode"]

MAGIC = b"SHMR"
VERSION = 1
_HEAD = struct.Struct("<4sBB")
_PID = struct.Struct("<I")
_PORT = struct.Struct("<H")


class Kind(enum.IntEnum):
    HELLO = 1
    WELCOME = 2
    BYE = 3
    REFUSE = 4


class Control(NamedTuple):
    kind: Kind
    pid: int = 0  # HELLO
    text: str = ""  # HELLO: the name; REFUSE: the reason
    port: int = 0  # WELCOME


def encode(c: Control) -> bytes:
    head = _HEAD.pack(MAGIC, VERSION, c.kind)
    if c.kind is Kind.HELLO:
        return head + _PID.pack(c.pid) + c.text.encode()
    if c.kind is Kind.WELCOME:
        return head + _PORT.pack(c.port)
    if c.kind is Kind.REFUSE:
        return head + c.text.encode()
    return head


def decode(data: Union[bytes, memoryview]) -> Control:
    """A control part; LinkCorrupted if it is not one this version knows."""
    b = bytes(data)
    if len(b) < _HEAD.size:
        raise LinkCorrupted(f"remote control message of {len(b)} bytes, shorter than its header")
    magic, version, kind = _HEAD.unpack_from(b)
    if magic != MAGIC or version != VERSION:
        raise LinkCorrupted(f"remote control message with magic {magic!r} version {version}: not shmhub.remote v{VERSION}")
    try:
        k = Kind(kind)
    except ValueError:
        raise LinkCorrupted(f"remote control message of unknown kind {kind}") from None
    body = b[_HEAD.size :]
    try:
        if k is Kind.HELLO:
            (pid,) = _PID.unpack_from(body)
            return Control(k, pid=pid, text=body[_PID.size :].decode())
        if k is Kind.WELCOME:
            if len(body) != _PORT.size:
                raise ValueError("WELCOME body is 2 bytes")
            return Control(k, port=_PORT.unpack(body)[0])
        if k is Kind.REFUSE:
            return Control(k, text=body.decode())
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise LinkCorrupted(f"malformed remote {k.name}: {e}") from None
    if body:
        raise LinkCorrupted(f"remote {k.name} with {len(body)} unexpected bytes")
    return Control(k)
