"""Shared by the asyncio tests and their guests: request / reply encoding with checkable content."""

import struct

HDR = struct.Struct("<cIQ")  # tag, peer id, sequence number
_BLOCK = bytes(range(256)) * 16


def body(seq: int) -> bytes:
    """Deterministic payload of request `seq`: mostly inline sizes, every 64th one slot-sized."""
    n = 3000 if seq % 64 == 63 else 16 + (seq % 13) * 4
    off = seq % 251
    return _BLOCK[off : off + n]


def request(peer: int, seq: int) -> bytes:
    return HDR.pack(b"Q", peer, seq) + body(seq)


def reply_to(data: bytes) -> bytes:
    """The host's answer to a request: tag A, same header, body reversed."""
    return b"A" + data[1 : HDR.size] + data[HDR.size :][::-1]


def check_request(data: bytes, peer: int, seq: int) -> None:
    if data != request(peer, seq):
        raise AssertionError(f"request {seq} of peer {peer} corrupted: {data[: HDR.size]!r}... ({len(data)} bytes)")


def check_reply(data: bytes, peer: int, seq: int) -> None:
    if data != reply_to(request(peer, seq)):
        raise AssertionError(f"reply {seq} to peer {peer} corrupted: {data[: HDR.size]!r}... ({len(data)} bytes)")


def sink_msg(seq: int, size: int) -> bytes:
    """A numbered message for aio_sink.py: 8-byte sequence number, then `size - 8` filler bytes."""
    return seq.to_bytes(8, "little") + bytes([seq & 0xFF]) * (size - 8)


def check_sink_msg(data: bytes, seq: int) -> None:
    if len(data) < 8 or int.from_bytes(data[:8], "little") != seq or data[8:] != bytes([seq & 0xFF]) * (len(data) - 8):
        raise AssertionError(f"message {seq} corrupted or out of order: {data[:16]!r}... ({len(data)} bytes)")
