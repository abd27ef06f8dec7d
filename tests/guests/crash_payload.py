"""Self-checking payloads for the crash tests, shared by the test process and the guests.

Every message is [header][body]: the header holds a per-stream nonce, the total length, a
sequence number, an ack (how many messages the sender has verified from its peer) and a CRC-32
over everything else. Size and body are functions of (nonce, seq), so the receiver checks not
only the CRC but that the message is exactly the one expected next in its stream: a stale frame
from an earlier guest on the same peer id, a duplicate, a gap or a torn slot all fail.
"""

from __future__ import annotations

import random
import struct
import zlib

HDR = struct.Struct("<IIQQI")  # nonce, total length, seq, ack, crc32
_CRC_OFF = HDR.size - 4
_POOL = random.Random(0x5EED_C0DE).randbytes(1 << 16)
MAX_SIZE = 12_000  # fits the test segment's largest slot class (16 KiB)
INLINE_MAX = 200  # below the segment's inline threshold (256)
SLOT_MIN = 300  # above it


def size_for(nonce: int, seq: int) -> int:
    """Deterministic size mix: about 1 in 3 messages goes by slot (several classes), the rest inline."""
    h = ((seq + 1) * 0x9E3779B1 ^ nonce * 0x85EBCA77) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x2C1B3C6D) & 0xFFFFFFFF
    h ^= h >> 12
    if h % 3 == 0:
        return SLOT_MIN + (h >> 4) % (MAX_SIZE - SLOT_MIN)
    return HDR.size + (h >> 4) % (INLINE_MAX - HDR.size)


def is_slot(nonce: int, seq: int) -> bool:
    return size_for(nonce, seq) > INLINE_MAX


def _body(nonce: int, seq: int, n: int) -> bytes:
    off = (seq * 131 + nonce * 7) % (len(_POOL) - MAX_SIZE)
    return _POOL[off : off + n]


def make(nonce: int, seq: int, ack: int = 0) -> bytes:
    n = size_for(nonce, seq)
    body = _body(nonce, seq, n - HDR.size)
    head = HDR.pack(nonce, n, seq, ack, 0)[:_CRC_OFF]
    crc = zlib.crc32(body, zlib.crc32(head))
    return head + struct.pack("<I", crc) + body


class BadMessage(AssertionError):
    pass


def check(buf, nonce: int, seq: int) -> int:
    """Verify that `buf` is message `seq` of stream `nonce`; returns its ack. Raises BadMessage."""
    with memoryview(buf) as mv:  # released on return, so the Message can be released afterwards
        return _check(mv, nonce, seq)


def _check(mv: memoryview, nonce: int, seq: int) -> int:
    n = mv.nbytes
    if n < HDR.size:
        raise BadMessage(f"stream {nonce:#x} seq {seq}: {n} bytes, shorter than the header")
    got_nonce, length, got_seq, ack, crc = HDR.unpack_from(mv, 0)
    calc = zlib.crc32(mv[HDR.size :], zlib.crc32(mv[:_CRC_OFF]))
    if crc != calc:
        raise BadMessage(
            f"stream {nonce:#x} seq {seq}: crc {crc:#010x} != computed {calc:#010x} (header nonce {got_nonce:#x} seq {got_seq} len {length}, {n} bytes)"
        )
    if got_nonce != nonce or got_seq != seq:
        raise BadMessage(f"stream {nonce:#x}: expected seq {seq}, got nonce {got_nonce:#x} seq {got_seq} (stale, duplicate or missing message)")
    want = size_for(nonce, seq)
    if length != n or n != want:
        raise BadMessage(f"stream {nonce:#x} seq {seq}: length field {length}, {n} bytes received, expected {want}")
    if mv[HDR.size :] != _body(nonce, seq, n - HDR.size):
        raise BadMessage(f"stream {nonce:#x} seq {seq}: body differs from the expected content")
    return ack
