"""Frame codec (format-v7 1.5, algorithms.md 2.2, DECISIONS 6, traps 4, 5, 6, 9).

Malformed frames are checked twice: as bytes through `decode_frame`, and written into a real ring
with grant/write_data/commit, where `read_frame()` must raise `LinkCorrupted` instead of returning
None (a silent stall, trap 9).
"""

from __future__ import annotations

import contextlib
import random
import struct

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import _native
from shmhub import layout as L
from shmhub.errors import LinkCorrupted
from shmhub.ring import InlineFrame, MmapRefFrame, SlotRefFrame, decode_frame, encode_frame

INLINE, SLOT, MMAP = L.KIND_INLINE, L.KIND_SLOT_REF, L.KIND_MMAP_REF
U32, U64 = 2**32 - 1, 2**64 - 1


@contextlib.contextmanager
def ring_of(cap: int):
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=cap, size_classes=((64, 1),))
    with Segment.create(cfg) as seg:
        yield seg, seg.h2g(1)


def header(total: int, flags: int = 0, ilen: int = 0, reserved0: int = 0) -> bytes:
    return struct.pack("<IBBH", total, flags, reserved0, ilen)


def put_raw(ring, data: bytes) -> None:
    off = ring.grant(len(data))
    assert off >= 0
    ring.write_data(off, data)
    ring.commit(len(data))


# --- An independent transcription of format-v7 1.5 / algorithms.md 2.2, the fuzz oracle ----------


class Bad(Exception):
    pass


def ref_decode(data: bytes):
    if len(data) < 8:
        raise Bad("short")
    total, flags, _res, ilen = struct.unpack_from("<IBBH", data)
    if total < 8 or total % 4 or total > len(data):
        raise Bad("total_len")
    if flags & 1 and flags & 2:
        raise Bad("flags")
    if flags & 1:
        if total < 20:
            raise Bad("slot-ref short")
        cls, ext, _r, slot, gen = struct.unpack_from("<BBHII", data, 8)
        return (SLOT, total, cls, ext, slot, gen)
    if flags & 2:
        if total < 32:
            raise Bad("mmap-ref short")
        map_id, gen, off, plen, mr_flags = struct.unpack_from("<IIQII", data, 8)
        return (L.KIND_MMAP_RETURN if mr_flags & L.MR_RETURN else MMAP, total, map_id, gen, off, plen)
    if ilen > total - 8:
        raise Bad("inline_payload_len")
    return (INLINE, total, bytes(data[8 : 8 + ilen] if ilen else data[8:total]))


# --------------------------------------------------------------------------------------------
# Well-formed frames
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", list(range(0, 13)) + [255, 256, 1000, L.MAX_INLINE_LEN])
def test_inline_roundtrip(n):
    p = bytes((i * 13 + 1) % 256 or 1 for i in range(n))
    raw = _native.encode_inline(p)
    total = L.align(8 + n, 4)
    assert len(raw) == total
    assert raw[:8] == header(total, 0, n)  # inline_payload_len filled, flags and reserved 0
    assert raw[8 : 8 + n] == p
    assert raw[8 + n :] == bytes(total - 8 - n), "padding must be zero"
    assert _native.decode_frame(raw) == (INLINE, total, p)
    assert decode_frame(raw) == InlineFrame(total, p)
    assert encode_frame(InlineFrame(total, p)) == raw


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 100])
def test_legacy_inline_payload_includes_padding(n):
    # inline_payload_len == 0: a pre-2026-03 writer; the payload is total_len - 8 bytes, padding included.
    p = b"\xab" * n
    raw = _native.encode_inline(p, legacy=True)
    total = L.align(8 + n, 4)
    assert raw[:8] == header(total, 0, 0)
    assert encode_frame(InlineFrame(total, p), legacy=True) == raw
    assert _native.decode_frame(raw) == (INLINE, total, p + bytes(total - 8 - n))
    # Whatever the legacy writer left in its padding is part of the payload.
    hand = header(total) + p + b"\x01\x02\x03"[: total - 8 - n]
    assert decode_frame(hand).payload == hand[8:total]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 7, 9])
def test_trap6_inline_payload_len_excludes_padding(n):
    # Trap 6: a modern frame's padding is never payload, even when it is not zero.
    p = b"\x5a" * n
    total = L.align(8 + n, 4)
    raw = header(total, 0, n) + p + b"\xee" * (total - 8 - n)
    assert decode_frame(raw) == InlineFrame(total, p)
    assert _native.encode_inline(p)[6:8] == struct.pack("<H", n)


def test_inline_payload_len_may_fill_the_whole_body():
    for total in (12, 16, 64):
        for ilen in range(1, total - 8 + 1):
            raw = header(total, 0, ilen) + bytes(range(total - 8))
            assert decode_frame(raw).payload == bytes(range(ilen))


@pytest.mark.parametrize("cls,ext,slot,gen", [(0, 0, 0, 0), (3, 0, 0x01020304, 0xDEADBEEF), (255, 255, U32, U32)])
def test_slot_ref_roundtrip(cls, ext, slot, gen):
    raw = _native.encode_slot_ref(cls, ext, slot, gen)
    assert raw == header(20, L.FLAG_SLOT_REF, 0) + struct.pack("<BBHII", cls, ext, 0, slot, gen)
    assert _native.decode_frame(raw) == (SLOT, 20, cls, ext, slot, gen)
    assert decode_frame(raw) == SlotRefFrame(20, cls, ext, slot, gen)
    assert encode_frame(SlotRefFrame(20, cls, ext, slot, gen)) == raw


@pytest.mark.parametrize("map_id,gen,off,plen", [(0, 0, 0, 0), (7, 1, 0x0102030405060708, 4096), (U32, U32, U64, U32)])
def test_mmap_ref_roundtrip(map_id, gen, off, plen):
    raw = _native.encode_mmap_ref(map_id, gen, off, plen)
    assert raw == header(32, L.FLAG_MMAP_REF, 0) + struct.pack("<IIQII", map_id, gen, off, plen, 0)
    assert _native.decode_frame(raw) == (MMAP, 32, map_id, gen, off, plen)
    assert decode_frame(raw) == MmapRefFrame(32, map_id, gen, off, plen)
    assert encode_frame(MmapRefFrame(32, map_id, gen, off, plen)) == raw


def test_mmap_return_ref_roundtrip():
    # FEATURE_MMAP_RETURN: MR_FLAGS (the v7 reserved word) bit 0 marks a return ref; other bits are ignored.
    raw = _native.encode_mmap_ref(7, 1, 4096, 100, L.MR_RETURN)
    assert raw == header(32, L.FLAG_MMAP_REF, 0) + struct.pack("<IIQII", 7, 1, 4096, 100, L.MR_RETURN)
    assert _native.decode_frame(raw) == (L.KIND_MMAP_RETURN, 32, 7, 1, 4096, 100)
    assert decode_frame(raw) == MmapRefFrame(32, 7, 1, 4096, 100, L.MR_RETURN)
    assert encode_frame(decode_frame(raw)) == raw
    other = raw[:28] + struct.pack("<I", 0x80000000)
    assert _native.decode_frame(other) == (MMAP, 32, 7, 1, 4096, 100)


def test_ref_frames_longer_than_their_body_are_accepted():
    # Lenient-but-bounded on read (format-v7 1.5): Rust accepts total_len >= 20 / >= 32.
    sr = _native.encode_slot_ref(1, 0, 2, 3)
    longer = struct.pack("<I", 24) + sr[4:] + bytes(4)
    assert decode_frame(longer) == SlotRefFrame(24, 1, 0, 2, 3)
    mr = _native.encode_mmap_ref(1, 2, 3, 4)
    longer = struct.pack("<I", 40) + mr[4:] + bytes(8)
    assert decode_frame(longer) == MmapRefFrame(40, 1, 2, 3, 4)


def test_decode_reads_only_the_first_frame():
    a, b = _native.encode_inline(b"first"), _native.encode_slot_ref(1, 0, 2, 3)
    assert decode_frame(a + b) == InlineFrame(16, b"first")
    assert decode_frame(b + a) == SlotRefFrame(20, 1, 0, 2, 3)
    assert decode_frame(memoryview(bytearray(a + b))) == InlineFrame(16, b"first")


def test_encode_inline_refuses_more_than_u16():
    with pytest.raises(ValueError):
        _native.encode_inline(bytes(L.MAX_INLINE_LEN + 1))


def test_every_frame_kind_through_a_ring():
    with ring_of(256) as (seg, ring):
        assert ring.write_inline(b"")
        assert ring.write_inline(b"hello")
        assert ring.write_slot_ref(255, 0, U32, 0x01020304)
        assert ring.write_mmap_ref(9, 2, U64, 77)
        put_raw(ring, _native.encode_inline(b"old", legacy=True))
        assert ring.indices[0] == 8 + 16 + 20 + 32 + 12
        frames = []
        while (f := ring.read_frame()) is not None:
            frames.append(f)
            ring.release(f[1])
        assert frames == [
            (INLINE, 8, b""),
            (INLINE, 16, b"hello"),
            (SLOT, 20, 255, 0, U32, 0x01020304),
            (MMAP, 32, 9, 2, U64, 77),
            (INLINE, 12, b"old\x00"),
        ]


def test_ring_bytes_equal_the_encoder_output():
    with ring_of(128) as (seg, ring):
        assert ring.write_inline(b"abcde")
        assert ring.write_slot_ref(2, 0, 5, 6)
        assert ring.write_mmap_ref(1, 0, 2**40 + 3, 99)
        data = ring.read_data(0, 16 + 20 + 32)
        assert data == (_native.encode_inline(b"abcde") + _native.encode_slot_ref(2, 0, 5, 6) + _native.encode_mmap_ref(1, 0, 2**40 + 3, 99))


def test_inline_padding_in_the_ring_is_zeroed():
    # Stale bytes in the ring must not leak into the padding a legacy reader would take as payload.
    with ring_of(64) as (seg, ring):
        ring.write_data(0, b"\xff" * 64)
        assert ring.write_inline(b"x")
        assert ring.read_data(0, 12) == header(12, 0, 1) + b"x\0\0\0"


def test_recv_inline_leaves_ref_frames_for_the_caller():
    with ring_of(128) as (seg, ring):
        assert ring.write_slot_ref(1, 0, 2, 3)
        assert ring.write_inline(b"after")
        assert ring.recv_inline() == (SLOT, 20, 1, 0, 2, 3)
        assert ring.recv_inline() == (SLOT, 20, 1, 0, 2, 3), "a ref frame is not released by recv_inline"
        ring.release(20)
        assert ring.recv_inline() == b"after"
        assert ring.recv_inline() is None


# --------------------------------------------------------------------------------------------
# Malformed frames: LinkCorrupted from decode_frame and from a ring (never None, trap 9)
# --------------------------------------------------------------------------------------------

MALFORMED = {
    # trap 5: 0 would make a reader release 0 bytes forever
    "total_len_0": header(0) + bytes(24),
    "total_len_4": header(4) + bytes(24),
    "total_len_7": header(7) + bytes(24),
    "total_len_0_slot_flag": header(0, L.FLAG_SLOT_REF) + bytes(24),
    "unaligned_9": header(9, 0, 1) + bytes(24),
    "unaligned_10": header(10, 0, 1) + bytes(24),
    "unaligned_11": header(11, 0, 1) + bytes(24),
    "unaligned_22_slot": header(22, L.FLAG_SLOT_REF) + bytes(24),
    "unaligned_33_mmap": header(33, L.FLAG_MMAP_REF) + bytes(32),
    "total_len_past_data": header(64, 0, 4) + bytes(24),
    "total_len_u32_max": header(U32 - 3, 0, 4) + bytes(24),
    "both_flags": header(32, 3) + bytes(24),
    "both_flags_plus_other_bits": header(32, 0xFF) + bytes(24),
    "slot_ref_8": header(8, L.FLAG_SLOT_REF) + bytes(24),
    "slot_ref_12": header(12, L.FLAG_SLOT_REF) + bytes(24),
    "slot_ref_16": header(16, L.FLAG_SLOT_REF) + bytes(24),
    "mmap_ref_8": header(8, L.FLAG_MMAP_REF) + bytes(24),
    "mmap_ref_20": header(20, L.FLAG_MMAP_REF) + bytes(24),
    "mmap_ref_28": header(28, L.FLAG_MMAP_REF) + bytes(24),
    # trap 4: the payload is bounded by total_len
    "inline_len_over_total_by_1": header(16, 0, 9) + bytes(24),
    "inline_len_u16_max": header(16, 0, 0xFFFF) + bytes(24),
    "inline_len_1_in_empty_frame": header(8, 0, 1) + bytes(24),
}

SHORT = [b"", b"\x08", b"\x08\x00\x00\x00", b"\x08\x00\x00\x00\x00\x00\x00"]


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_bytes_raise(name):
    raw = MALFORMED[name]
    with pytest.raises(LinkCorrupted):
        _native.decode_frame(raw)
    with pytest.raises(LinkCorrupted):
        decode_frame(raw)
    with pytest.raises(Bad):  # the oracle agrees (keeps the table honest)
        ref_decode(raw)


@pytest.mark.parametrize("raw", SHORT, ids=lambda b: f"{len(b)}_bytes")
def test_fewer_than_8_bytes_raise(raw):
    with pytest.raises(LinkCorrupted):
        _native.decode_frame(raw)
    with pytest.raises(LinkCorrupted):
        decode_frame(raw)


def test_truncated_good_frames_raise():
    for good in (_native.encode_inline(b"payload!"), _native.encode_slot_ref(1, 0, 2, 3), _native.encode_mmap_ref(1, 2, 3, 4)):
        for cut in range(len(good)):
            with pytest.raises(LinkCorrupted):
                decode_frame(good[:cut])


def _assert_ring_corrupted(ring):
    before = ring.indices
    for _ in range(2):  # terminal: it keeps raising, it never turns into "nothing to read"
        with pytest.raises(LinkCorrupted):
            ring.read_frame()
        with pytest.raises(LinkCorrupted):
            ring.recv_inline()
    assert ring.indices == before, "a malformed frame must not be consumed"


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_in_a_ring_is_terminal(name):
    raw = MALFORMED[name]
    assert len(raw) % 4 == 0
    with ring_of(128) as (seg, ring):
        put_raw(ring, raw)
        _assert_ring_corrupted(ring)


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_after_good_ones_in_a_ring(name):
    with ring_of(256) as (seg, ring):
        assert ring.write_inline(b"good")
        assert ring.write_slot_ref(1, 0, 2, 3)
        put_raw(ring, MALFORMED[name])
        assert ring.recv_inline() == b"good"
        assert ring.recv_inline() == (SLOT, 20, 1, 0, 2, 3)
        ring.release(20)
        _assert_ring_corrupted(ring)


@pytest.mark.parametrize("n", range(1, 8))
def test_fewer_than_8_readable_bytes_in_a_ring(n):
    with ring_of(64) as (seg, ring):
        put_raw(ring, header(8)[:n])
        _assert_ring_corrupted(ring)


def test_fewer_than_8_bytes_left_in_the_tail():
    # The contiguous readable region is what bounds a frame: a tail of 4 bytes before the
    # watermark cannot hold a header even though the front holds a good frame.
    with ring_of(128) as (seg, ring):
        ring.write_data(0, _native.encode_inline(b"front"))
        ring.write_data(120, header(16)[:4])
        for k, v in ((L.RING_WRITE, 16), (L.RING_WATERMARK, 124), (L.RING_READ, 120)):
            seg.region.store_u32(ring.offset + k, v)
        _assert_ring_corrupted(ring)


def test_frame_running_past_the_watermark_is_corrupt():
    # total_len fits in the capacity but not in the tail [read, watermark): frames never straddle.
    with ring_of(128) as (seg, ring):
        frame = _native.encode_inline(b"x" * 24)  # 32 bytes
        ring.write_data(96, frame[:16])
        ring.write_data(0, _native.encode_inline(b"front"))
        for k, v in ((L.RING_WRITE, 16), (L.RING_WATERMARK, 112), (L.RING_READ, 96)):
            seg.region.store_u32(ring.offset + k, v)
        _assert_ring_corrupted(ring)


def test_frame_running_past_write_is_corrupt():
    with ring_of(128) as (seg, ring):
        raw = _native.encode_inline(b"y" * 40)  # 48 bytes, only 24 committed
        off = ring.grant(48)
        ring.write_data(off, raw)
        ring.commit(24)
        _assert_ring_corrupted(ring)
        ring.commit(24)  # once the rest is published the same frame is fine
        assert ring.recv_inline() == b"y" * 40


def test_exact_boundaries_are_accepted():
    with ring_of(64) as (seg, ring):
        put_raw(ring, header(16, 0, 8) + b"12345678")  # inline_payload_len == total_len - 8
        put_raw(ring, header(20, L.FLAG_SLOT_REF) + bytes(12))
        put_raw(ring, header(8))  # empty frame
        assert ring.recv_inline() == b"12345678"
        assert ring.recv_inline() == (SLOT, 20, 0, 0, 0, 0)
        ring.release(20)
        assert ring.recv_inline() == b""
        assert ring.recv_inline() is None


# --------------------------------------------------------------------------------------------
# Fuzz: seeded random bytes never produce anything but a bounded frame or LinkCorrupted
# --------------------------------------------------------------------------------------------


def _fuzz_inputs(seed: int, count: int):
    rng = random.Random(seed)
    for i in range(count):
        n = rng.choice([rng.randrange(0, 12), rng.randrange(8, 48), rng.randrange(8, 300)])
        data = bytearray(rng.randbytes(n))
        if n >= 8 and i % 4:  # mostly plausible headers, so the deeper checks are reached
            fit = rng.randrange(8, n + 1) & ~3  # an aligned total_len inside the data
            total = rng.choice([fit] * 6 + [rng.randrange(0, n + 12), rng.randrange(0, 40), U32 - rng.randrange(8)])
            flags = rng.choice([0, 0, 1, 2, 3, rng.randrange(256)])
            ilen = rng.choice([0, rng.randrange(0, min(max(total - 6, 1), 65536)), rng.randrange(0, min(max(total - 6, 1), 65536)), rng.randrange(65536)])
            data[:8] = struct.pack("<IBBH", total, flags, rng.randrange(256) if i % 7 == 0 else 0, ilen)
        yield bytes(data)


def test_fuzz_decode_frame():
    outcomes = {INLINE: 0, SLOT: 0, MMAP: 0, "bad": 0}  # MMAP: ordinary and return refs
    for data in _fuzz_inputs(seed=20260401, count=4000):
        try:
            expect = ref_decode(data)
        except Bad:
            expect = None
        try:
            got = _native.decode_frame(data)
        except LinkCorrupted:
            got = None
        # Any other exception propagates and fails the test.
        if got is not None:
            assert got[0] in (INLINE, SLOT, MMAP, L.KIND_MMAP_RETURN)
            assert 8 <= got[1] <= len(data) and got[1] % 4 == 0
            if got[0] == INLINE:
                assert len(got[2]) <= got[1] - 8
        assert got == expect, data.hex()
        outcomes[(MMAP if got[0] == L.KIND_MMAP_RETURN else got[0]) if got is not None else "bad"] += 1
    # The generator must exercise both outcomes substantially.
    assert min(outcomes.values()) >= 100 and outcomes["bad"] > 1000, outcomes


def test_fuzz_read_frame_from_a_ring():
    rng = random.Random(7)
    with ring_of(512) as (seg, ring):
        for data in _fuzz_inputs(seed=99, count=600):
            data = data[: len(data) - len(data) % 4]
            if not data:
                continue
            ring.reset()
            put_raw(ring, data)
            try:
                expect = ref_decode(data)
            except Bad:
                expect = None
            try:
                got = ring.read_frame()
                assert got is not None, "committed bytes were reported as nothing to read (trap 9)"
            except LinkCorrupted:
                got = None
            assert got == expect, data.hex()
            if got is not None and rng.random() < 0.5:
                ring.release(got[1])
                assert ring.indices[2] == got[1]
