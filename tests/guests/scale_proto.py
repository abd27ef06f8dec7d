"""The wire of the scale tests (tests/scale), shared by the guest program and the tests.

Every payload starts with an 8-byte header: kind (u8), pad (u8), guest index (u16), sequence
number (u32); the rest is one fill byte derived from (index, seq), so a receiver can check the
length, the header and the content of every message cheaply. Sizes are seeded per guest."""

from __future__ import annotations

import json
import random
import struct

HDR = struct.Struct("<BBHI")
DATA, DONE, HELLO, CMD, PONG, MARK = 1, 2, 3, 4, 5, 6
KINDS = {DATA: "data", DONE: "done", HELLO: "hello", CMD: "cmd", PONG: "pong", MARK: "mark"}
STOP = b"!"  # a 1-byte message: stop (shorter than any header)


def fill_byte(idx: int, seq: int) -> int:
    return (idx * 131 + seq * 7 + 1) & 0xFF


def make(kind: int, idx: int, seq: int, n: int = HDR.size) -> bytes:
    """Message `seq` of guest `idx`, n >= 8 bytes."""
    return HDR.pack(kind, 0, idx, seq) + bytes((fill_byte(idx, seq),)) * (n - HDR.size)


def command(op: str, **params) -> bytes:
    return HDR.pack(CMD, 0, 0, 0) + json.dumps({"op": op, **params}).encode()


def parse_command(data) -> dict:
    return json.loads(bytes(memoryview(data)[HDR.size :]))


def header(data) -> tuple:
    """(kind, idx, seq) of a message (ValueError if it is shorter than a header)."""
    if len(data) < HDR.size:
        raise ValueError(f"message of {len(data)} bytes has no header")
    kind, _, idx, seq = HDR.unpack_from(data)
    return kind, idx, seq


def check(data, kind: int, idx: int, seq: int, n: int):
    """None if `data` is message (kind, idx, seq) of n bytes, else what is wrong with it."""
    with memoryview(data) as mv:  # released before returning: a Message refuses release() under a live view
        if len(mv) != n:
            got = HDR.unpack_from(mv) if len(mv) >= HDR.size else None
            return f"guest {idx} seq {seq}: {len(mv)} bytes, expected {n} (header {got})"
        k, _, i, s = HDR.unpack_from(mv)
        if (k, i, s) != (kind, idx, seq):
            return f"expected {KINDS.get(kind)} of guest {idx} seq {seq}, got kind {k} guest {i} seq {s} (lost, duplicated or reordered)"
        b = fill_byte(idx, seq)
        if n > HDR.size and (mv[HDR.size] != b or mv[n - 1] != b or mv[(HDR.size + n) // 2] != b):
            return f"guest {idx} seq {seq}: content corrupted"
    return None


def sizes(seed: int, idx: int, count: int, lo: int, hi: int) -> list:
    """`count` payload sizes of guest `idx`, uniform in [lo, hi], the same in every process."""
    rng = random.Random(f"shmhub-scale/{seed}/{idx}")  # str seeds do not depend on PYTHONHASHSEED
    return [rng.randint(lo, hi) for _ in range(count)]
