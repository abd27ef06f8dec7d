"""BipBuffer ring (algorithms.md 2.1, DECISIONS 5-7, traps 1-4 and 10).

Every edge case listed in algorithms.md 2.1 has a test here. Index states that the API cannot
reach in one thread (a wrap seen half-way, corrupted indices) are stored directly into the ring
header through `seg.region`, the same shared memory the other process would write.
"""

from __future__ import annotations

import contextlib
import itertools

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub.errors import LinkCorrupted

KIND_INLINE = L.KIND_INLINE


@contextlib.contextmanager
def ring_of(cap: int, inline_threshold: int = L.DEFAULT_INLINE_THRESHOLD):
    """A one-guest segment with rings of `cap` bytes; yields (segment, its G2H ring)."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=cap, inline_threshold=inline_threshold, size_classes=((64, 1),))
    with Segment.create(cfg) as seg:
        yield seg, seg.g2h(1)


def set_indices(seg: Segment, ring, write: int, watermark: int, read: int) -> None:
    """Store a synthetic (write, watermark, read) state, as another process could."""
    seg.region.store_u32(ring.offset + L.RING_WRITE, write)
    seg.region.store_u32(ring.offset + L.RING_WATERMARK, watermark)
    seg.region.store_u32(ring.offset + L.RING_READ, read)
    ring.forget()  # a forged state is no successor of the last one this ring object saw


def entry_len(payload_len: int) -> int:
    return L.align(L.FRAME_HEADER_SIZE + payload_len, L.FRAME_ALIGN)


_PATTERN = bytes(1 + (i * 7) % 251 for i in range(L.MAX_INLINE_LEN + 1024))


def payload(n: int, seed: int = 0) -> bytes:
    # Never zero, so payload bytes cannot be mistaken for padding or an empty ring.
    s = (seed * 31) % 251
    return _PATTERN[s : s + n]


def put_raw(ring, data: bytes) -> int:
    """Producer side of a raw entry: grant, write, commit. Returns the offset."""
    off = ring.grant(len(data))
    assert off >= 0, f"no room for {len(data)} bytes at {ring.indices}"
    ring.write_data(off, data)
    ring.commit(len(data))
    return off


def recv(ring) -> bytes:
    """Consumer side of one inline frame: read, check, release."""
    frame = ring.read_frame()
    assert frame is not None and frame[0] == KIND_INLINE, frame
    ring.release(frame[1])
    return frame[2]


def drive_to(ring, x: int) -> None:
    """Leave the ring empty with both indices at x (write == read == x, no watermark)."""
    ring.reset()
    if x:
        put_raw(ring, bytes(x))
        assert ring.readable() == (0, x)
        ring.release(x)
    assert ring.indices == (x, 0, x)


# --- An independent transcription of algorithms.md 2.1, used as the oracle of the table tests ---


def spec_grant(cap, w, wm, r, n):
    """(offset or None, (write, watermark, read) afterwards) per algorithms.md 2.1."""
    if n > cap:
        return None, (w, wm, r)
    if n == 0:
        return w, (w, wm, r)
    if w >= r:
        if cap - w >= n:
            return w, (w, wm, r)
        if r == 0:
            return None, (w, wm, r)
        return (0 if n < r else None), (0, w, r)  # the wrap stays even when the front is too small
    return (w if w + n < r else None), (w, wm, r)


def spec_readable(w, wm, r):
    """((start, length), state afterwards); length 0 means empty."""
    if wm:
        if r < wm:
            return (r, wm - r), (w, wm, r)
        return (0, w), (w, 0, 0)
    return (r, w - r), (w, wm, r)


def spec_release(cap, w, wm, r, n):
    nr = r + n
    if nr > cap:
        return None
    if wm and nr >= wm:
        return (w, 0, 0)
    return (w, wm, nr)


def valid_states(cap, step=4):
    """Every index state the algorithm can reach for this capacity (multiples of `step`)."""
    vals = range(0, cap + 1, step)
    for r, w in itertools.product(vals, vals):
        if r <= w:
            yield (w, 0, r)
    for w, r, wm in itertools.product(vals, vals, vals):
        if wm and w < r <= wm:  # wrapped: the tail [r, wm) is still to be read
            yield (w, wm, r)


# --------------------------------------------------------------------------------------------
# Edge cases of algorithms.md 2.1
# --------------------------------------------------------------------------------------------


def test_fresh_ring_is_empty():
    with ring_of(128) as (seg, ring):
        assert ring.capacity == 128
        assert ring.indices == (0, 0, 0)
        assert ring.readable()[1] == 0
        assert ring.read_frame() is None
        assert ring.recv_inline() is None


@pytest.mark.parametrize("cap", [64, 128, 4096])
def test_exact_capacity_grant(cap):
    with ring_of(cap) as (seg, ring):
        assert ring.can_grant(cap)
        assert ring.grant(cap) == 0
        ring.write_data(0, payload(cap))
        ring.commit(cap)
        assert ring.indices == (cap, 0, 0)
        # Completely full: nothing more fits, and read == 0 forbids wrapping.
        assert not ring.can_grant(4)
        assert ring.grant(4) == -1
        assert ring.indices == (cap, 0, 0)
        assert ring.readable() == (0, cap)
        assert ring.read_data(0, cap) == payload(cap)
        ring.release(cap)
        assert ring.indices == (cap, 0, cap)
        assert ring.readable()[1] == 0


@pytest.mark.parametrize("cap", [64, 256])
def test_exact_capacity_inline_frame(cap):
    with ring_of(cap) as (seg, ring):
        p = payload(cap - 8, seed=3)
        assert ring.write_inline(p)
        assert ring.indices == (cap, 0, 0)
        assert not ring.write_inline(b"")  # full, and read == 0 forbids the wrap
        assert ring.indices == (cap, 0, 0)
        assert recv(ring) == p
        assert ring.read_frame() is None


def test_exact_fit_at_the_end_does_not_wrap():
    # cap - write == n takes the tail (>=, not >): no watermark is set.
    with ring_of(128) as (seg, ring):
        put_raw(ring, bytes(96))
        ring.release(32)
        assert ring.indices == (96, 0, 32)
        assert ring.grant(32) == 96
        assert ring.indices == (96, 0, 32)
        ring.commit(32)
        assert ring.indices == (128, 0, 32)


def test_exact_capacity_grant_on_empty_ring_at_cap_needs_the_consumer():
    # Empty ring at X == cap: the full-capacity grant wraps (never undone) but fails; the
    # consumer's next read resets both indices, after which the same grant succeeds (2.1 caveat).
    with ring_of(128) as (seg, ring):
        drive_to(ring, 128)
        assert not ring.can_grant(128)
        assert ring.grant(128) == -1
        assert ring.indices == (0, 128, 128)
        assert ring.readable()[1] == 0
        assert ring.indices == (0, 0, 0)
        assert ring.grant(128) == 0


def test_read_zero_blocks_wrapping():
    with ring_of(128) as (seg, ring):
        assert ring.write_inline(payload(100))  # entry of 108 at [0, 108)
        assert ring.indices == (108, 0, 0)
        # 20 bytes left at the end; a 24-byte entry would have to wrap, but read == 0 means the
        # wrap would make write == read == 0 ("empty") over unread data.
        assert not ring.can_grant(24)
        assert ring.grant(24) == -1
        assert ring.indices == (108, 0, 0), "read == 0 must not store a watermark or move write"
        assert not ring.write_inline(payload(16))
        assert ring.indices == (108, 0, 0)
        assert ring.write_inline(payload(12))  # 20 bytes still fit exactly at the end
        assert recv(ring) == payload(100)
        assert recv(ring) == payload(12)
        assert ring.read_frame() is None


def _tail_state(ring):
    """A at [0, 32), B at [32, 240), A consumed: (write=240, watermark=0, read=32), cap 256."""
    assert ring.write_inline(payload(24, 1))
    assert ring.write_inline(payload(200, 2))
    assert recv(ring) == payload(24, 1)
    assert ring.indices == (240, 0, 32)


def test_failed_wrap_is_never_undone_and_the_tail_drains_first():
    # Trap 3: a wrap whose front is too small reports full but leaves (watermark=W, write=0).
    with ring_of(256) as (seg, ring):
        _tail_state(ring)
        assert not ring.write_inline(payload(32, 3))  # entry 40: 16 left at the end, 40 >= read 32
        assert ring.indices == (0, 240, 32)
        # Asking again neither undoes nor re-wraps.
        assert ring.grant(40) == -1
        assert ring.indices == (0, 240, 32)
        # The consumer still sees the tail first, then empty.
        frame = ring.read_frame()
        assert frame == (KIND_INLINE, 208, payload(200, 2))
        ring.release(208)
        assert ring.indices == (0, 0, 0)
        assert ring.read_frame() is None
        # And the ring is fully usable again.
        assert ring.write_inline(payload(32, 3))
        assert recv(ring) == payload(32, 3)
        assert ring.read_frame() is None


def test_failed_wrap_on_an_empty_ring_is_rescued_by_the_next_read():
    # Empty ring at X with cap - X < n and n >= X: the wrap fails, the consumer's read resets.
    with ring_of(128) as (seg, ring):
        drive_to(ring, 64)
        assert ring.grant(72) == -1
        assert ring.indices == (0, 64, 64)
        assert ring.read_frame() is None  # nothing to read: read == watermark resets to 0
        assert ring.indices == (0, 0, 0)
        assert ring.grant(72) == 0


def test_successful_wrap_tail_consumed_by_release():
    with ring_of(256) as (seg, ring):
        _tail_state(ring)
        assert ring.write_inline(payload(12, 4))  # entry 20 < read 32: wraps to [0, 20)
        assert ring.indices == (20, 240, 32)
        frame = ring.read_frame()
        assert frame == (KIND_INLINE, 208, payload(200, 2))  # tail first
        ring.release(208)  # reaching the watermark resets read and watermark at once
        assert ring.indices == (20, 0, 0)
        assert recv(ring) == payload(12, 4)
        assert ring.indices == (20, 0, 20)
        assert ring.read_frame() is None


def test_release_past_the_watermark_also_resets():
    with ring_of(256) as (seg, ring):
        _tail_state(ring)
        assert ring.write_inline(payload(12, 4))
        ring.release(212)  # r + n > watermark
        assert ring.indices == (20, 0, 0)


def test_tail_consumed_by_a_later_read():
    # The consumer released everything before the producer wrapped: read == watermark, and it is
    # the next *read* that resets read and watermark, then returns the front.
    with ring_of(256) as (seg, ring):
        _tail_state(ring)
        assert recv(ring) == payload(200, 2)
        assert ring.indices == (240, 0, 240)
        assert ring.write_inline(payload(40, 5))  # 48 bytes: 16 left at the end, 48 < read 240
        assert ring.indices == (48, 240, 240)
        assert ring.readable() == (0, 48)
        assert ring.indices == (48, 0, 0)
        assert recv(ring) == payload(40, 5)
        assert ring.read_frame() is None


def test_synthetic_state_20_40_10_yields_the_tail_first():
    # algorithms.md 2.1: read=20 / watermark=40 / write=10 must yield [20, 40) first.
    with ring_of(64) as (seg, ring):
        ring.write_data(0, b"F" * 10)
        ring.write_data(20, b"T" * 20)
        set_indices(seg, ring, write=10, watermark=40, read=20)
        assert ring.readable() == (20, 20)
        assert ring.read_data(20, 20) == b"T" * 20
        assert ring.indices == (10, 40, 20)  # looking does not consume
        ring.release(20)
        assert ring.indices == (10, 0, 0)
        assert ring.readable() == (0, 10)
        assert ring.read_data(0, 10) == b"F" * 10
        ring.release(10)
        assert ring.readable()[1] == 0


def test_synthetic_wrapped_state_yields_tail_frame_then_front_frame():
    from shmhub._native import encode_inline

    with ring_of(64) as (seg, ring):
        tail, front = encode_inline(b"tail-frame12"), encode_inline(b"fnt")
        assert (len(tail), len(front)) == (20, 12)
        ring.write_data(20, tail)
        ring.write_data(0, front)
        set_indices(seg, ring, write=12, watermark=40, read=20)
        assert ring.recv_inline() == b"tail-frame12"
        assert ring.indices == (12, 0, 0)
        assert ring.recv_inline() == b"fnt"
        assert ring.recv_inline() is None


def test_trap1_watermark_set_and_write_zero_reports_the_tail():
    # Trap 1: the consumer must honour the watermark whenever it sees write == 0 after a wrap;
    # concluding "empty" from (write=0, read>0) would deadlock the link.
    from shmhub._native import encode_inline

    with ring_of(128) as (seg, ring):
        frame = encode_inline(payload(30))
        ring.write_data(64, frame)
        set_indices(seg, ring, write=0, watermark=64 + len(frame), read=64)
        assert ring.readable() == (64, len(frame))
        got = ring.read_frame()
        assert got is not None, "a pending tail was reported as empty (trap 1)"
        assert got == (KIND_INLINE, len(frame), payload(30))
        ring.release(got[1])
        assert ring.indices == (0, 0, 0)
        assert ring.read_frame() is None


def test_trap2_write_never_lands_on_read_after_a_wrap():
    # Trap 2: with `<=` a grant could end exactly at read; write == read then reads as "not
    # wrapped" and the producer's next grant goes over the unread tail.
    with ring_of(128) as (seg, ring):
        a, b, c = payload(24, 1), payload(56, 2), payload(24, 3)
        assert ring.write_inline(a)  # [0, 32)
        assert ring.write_inline(b)  # [32, 96)
        assert ring.write_inline(c)  # [96, 128): write == cap
        assert recv(ring) == a
        assert ring.indices == (128, 0, 32)
        # Wrap with a front exactly as large as read (n == read): must fail, wrap kept.
        assert not ring.can_grant(32)
        assert ring.grant(32) == -1
        assert ring.indices == (0, 128, 32)
        # Already wrapped: write + n == read must fail too; write + n < read succeeds.
        assert not ring.can_grant(32)
        assert ring.grant(32) == -1
        assert ring.can_grant(28)
        d = payload(20, 4)
        assert ring.write_inline(d)  # [0, 28)
        assert ring.indices == (28, 128, 32)
        assert not ring.can_grant(4)  # 28 + 4 == read
        assert ring.grant(4) == -1
        assert not ring.write_inline(b"")
        assert ring.indices == (28, 128, 32)
        w, wm, r = ring.indices
        assert w < r, "write reached read while the tail is unread"
        # Nothing was overwritten: everything comes out intact, in order.
        assert [recv(ring) for _ in range(3)] == [b, c, d]
        assert ring.read_frame() is None


def test_trap2_would_be_corruption_is_refused_from_a_synthetic_state():
    # (write=24, watermark=60, read=32): a grant of 8 would end on read. Check that the data the
    # `<=` bug would have clobbered is still delivered.
    from shmhub._native import encode_inline

    with ring_of(64) as (seg, ring):
        tail = encode_inline(payload(20, 7))  # 28 bytes at [32, 60)
        front = encode_inline(payload(16, 8))  # 24 bytes at [0, 24)
        ring.write_data(32, tail)
        ring.write_data(0, front)
        set_indices(seg, ring, write=24, watermark=60, read=32)
        assert ring.grant(8) == -1
        assert ring.grant(4) == 24
        assert ring.indices == (24, 60, 32)
        assert ring.recv_inline() == payload(20, 7)
        assert ring.recv_inline() == payload(16, 8)


# The producer's wrap is two stores: watermark = W, then write = 0 (2.1). A consumer may run
# between them (the producer is preempted, or on a weakly ordered CPU the second store is not yet
# visible) and then sees write == watermark == W, a state no finished operation leaves behind
# (a settled wrap always has write < read <= watermark). The bytes in [0, W) are the previous
# lap's, already consumed: like an undone wrap (trap 3), reading them is stale data exposure.


def _stale_lap(ring):
    """Three frames at [0, 96) of a 128-byte ring, all consumed: (write=96, watermark=0, read=96)."""
    for i in range(3):
        assert ring.write_inline(payload(24, 10 + i))
    for i in range(3):
        assert recv(ring) == payload(24, 10 + i)
    assert ring.indices == (96, 0, 96)


def _finish_wrap_and_commit(seg, ring, p: bytes):
    """The producer's second wrap store, then a new frame at the front."""
    from shmhub._native import encode_inline

    seg.region.store_u32(ring.offset + L.RING_WRITE, 0)
    raw = encode_inline(p)
    ring.write_data(0, raw)
    ring.commit(len(raw))


def test_mid_wrap_on_an_empty_ring_exposes_no_stale_frame():
    with ring_of(128) as (seg, ring):
        _stale_lap(ring)
        # Producer wrapping for a 40-byte entry (16 bytes left at the end): first store only.
        seg.region.store_u32(ring.offset + L.RING_WATERMARK, 96)
        for _ in range(2):
            got = ring.read_frame()
            assert got is None, f"stale frame from the previous lap delivered mid-wrap: {got}"
        _finish_wrap_and_commit(seg, ring, b"new after wrap")
        assert ring.recv_inline() == b"new after wrap"
        assert ring.read_frame() is None


def test_mid_wrap_tail_drained_exposes_no_stale_frame():
    with ring_of(128) as (seg, ring):
        assert ring.write_inline(payload(24, 1))  # A [0, 32)
        assert ring.write_inline(payload(56, 2))  # B [32, 96)
        assert recv(ring) == payload(24, 1)
        seg.region.store_u32(ring.offset + L.RING_WATERMARK, 96)  # first wrap store only
        assert recv(ring) == payload(56, 2)  # the tail is valid and comes first
        for _ in range(2):
            got = ring.read_frame()
            assert got is None, f"stale frame A delivered again after the tail, mid-wrap: {got}"
        _finish_wrap_and_commit(seg, ring, b"C")
        assert ring.recv_inline() == b"C"
        assert ring.read_frame() is None


# --------------------------------------------------------------------------------------------
# Bounds (trap 4 and DECISIONS 3): indices and lengths are checked, never trusted
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [65, 68, 2**31, 2**32 - 1, 2**32 - 64])
def test_trap4_commit_past_capacity(n):
    # 2**32 - 64 would wrap a naive u32 `write + n` to 0.
    with ring_of(128) as (seg, ring):
        put_raw(ring, bytes(64))
        with pytest.raises(LinkCorrupted):
            ring.commit(n)
        assert ring.indices == (64, 0, 0), "a rejected commit must not move write"


def test_trap4_commit_on_full_ring():
    with ring_of(64) as (seg, ring):
        put_raw(ring, bytes(64))
        with pytest.raises(LinkCorrupted):
            ring.commit(4)
        ring.commit(0)  # zero is always fine
        assert ring.indices == (64, 0, 0)


@pytest.mark.parametrize("n", [68, 129, 2**31, 2**32 - 1, 2**32 - 64])
def test_trap4_release_past_capacity(n):
    with ring_of(128) as (seg, ring):
        put_raw(ring, bytes(64))
        ring.release(64)
        with pytest.raises(LinkCorrupted):
            ring.release(n)
        assert ring.indices == (64, 0, 64), "a rejected release must not move read"


@pytest.mark.parametrize("field", ["write", "watermark", "read"])
@pytest.mark.parametrize("value", [132, 2**31, 2**32 - 1])
def test_trap4_index_in_shared_memory_beyond_capacity(field, value):
    with ring_of(128) as (seg, ring):
        state = {"write": 8, "watermark": 0, "read": 0}
        if field == "watermark":
            state = {"write": 8, "watermark": 0, "read": 16}
        state[field] = value
        set_indices(seg, ring, **state)
        before = ring.indices
        calls = {
            "write": [
                lambda: ring.grant(4),
                lambda: ring.can_grant(4),
                lambda: ring.commit(4),
                ring.readable,
                ring.read_frame,
                ring.recv_inline,
                lambda: ring.write_inline(b"x"),
            ],
            "watermark": [ring.readable, ring.read_frame, ring.recv_inline, lambda: ring.release(4)],
            "read": [
                lambda: ring.grant(4),
                lambda: ring.can_grant(4),
                ring.readable,
                ring.read_frame,
                ring.recv_inline,
                lambda: ring.release(4),
                lambda: ring.write_inline(b"x"),
            ],
        }[field]
        for call in calls:
            with pytest.raises(LinkCorrupted):
                call()
        assert ring.indices == before, "a corrupted ring must not be modified further"
        ring.reset()  # recovery still works
        assert ring.indices == (0, 0, 0)
        assert ring.write_inline(b"ok") and ring.recv_inline() == b"ok"


def test_read_past_write_without_watermark_is_corrupt():
    with ring_of(128) as (seg, ring):
        set_indices(seg, ring, write=16, watermark=0, read=32)
        with pytest.raises(LinkCorrupted):
            ring.readable()
        with pytest.raises(LinkCorrupted):
            ring.read_frame()


def test_write_data_and_read_data_stay_inside_the_ring():
    with ring_of(64) as (seg, ring):
        for off, n in [(-1, 1), (64, 1), (60, 5), (0, 65)]:
            with pytest.raises(IndexError):
                ring.write_data(off, bytes(n))
            with pytest.raises(IndexError):
                ring.read_data(off, n)
        with pytest.raises(IndexError):
            ring.read_data(0, -1)
        ring.write_data(60, b"abcd")
        assert ring.read_data(60, 4) == b"abcd"


# --------------------------------------------------------------------------------------------
# n = 0, n > capacity, can_grant, reset
# --------------------------------------------------------------------------------------------


def test_zero_grant_is_trivially_ok_and_never_wraps():
    with ring_of(128) as (seg, ring):
        assert ring.grant(0) == 0 and ring.can_grant(0)
        ring.commit(0)
        assert ring.indices == (0, 0, 0)
        # Full ring, and a state where any positive grant would wrap: n = 0 still succeeds, no store.
        put_raw(ring, bytes(128))
        assert ring.grant(0) == 128 and ring.can_grant(0)
        ring.release(32)
        assert ring.indices == (128, 0, 32)
        assert ring.grant(0) == 128
        assert ring.indices == (128, 0, 32), "grant(0) must not wrap"


@pytest.mark.parametrize("state", [(0, 0, 0), (64, 0, 64), (128, 0, 32), (8, 128, 64)])
def test_grant_larger_than_capacity_is_full(state):
    with ring_of(128) as (seg, ring):
        set_indices(seg, ring, *state)
        for n in (129, 132, 256, 2**32 - 1):
            assert not ring.can_grant(n)
            assert ring.grant(n) == -1
            # Refused; at most the kept wrap of 2.1 may have been stored.
            w, wm, r = state
            assert ring.indices in (state, (0, w, r) if w >= r > 0 else state)
            set_indices(seg, ring, *state)
        assert not ring.write_inline(bytes(128 - 8 + 1))  # entry of 132 > cap


def test_inline_payload_above_u16_is_refused():
    with ring_of(128) as (seg, ring):
        with pytest.raises(ValueError):
            ring.write_inline(bytes(L.MAX_INLINE_LEN + 1))
        assert ring.indices == (0, 0, 0)


def test_grant_and_can_grant_match_the_spec_in_every_state():
    # can_grant is grant's predicate without stores; grant follows 2.1 including the kept wrap.
    cap = 64
    ns = [0, 1, 3, 4, 5, *range(8, cap + 1, 4), cap + 1, cap + 4, 2**32 - 1]
    with ring_of(cap) as (seg, ring):
        checked = 0
        for state in valid_states(cap):
            for n in ns:
                off, after = spec_grant(cap, *state, n)
                set_indices(seg, ring, *state)
                assert ring.can_grant(n) == (off is not None), (state, n)
                assert ring.indices == state, f"can_grant({n}) mutated {state}"
                assert ring.grant(n) == (-1 if off is None else off), (state, n)
                if n <= cap:
                    assert ring.indices == after, (state, n)
                checked += 1
        assert checked > 10_000


def test_readable_and_release_match_the_spec_in_every_state():
    cap = 64
    with ring_of(cap) as (seg, ring):
        for state in valid_states(cap):
            set_indices(seg, ring, *state)
            (start, n), after = spec_readable(*state)
            got = ring.readable()
            assert got[1] == n and (n == 0 or got[0] == start), state
            assert ring.indices == after, state
            for k in range(0, cap + 8, 4):
                set_indices(seg, ring, *state)
                expect = spec_release(cap, *state, k)
                if expect is None:
                    with pytest.raises(LinkCorrupted):
                        ring.release(k)
                    assert ring.indices == state
                else:
                    ring.release(k)
                    assert ring.indices == expect, (state, k)


@pytest.mark.parametrize("state", [(96, 0, 32), (8, 120, 64), (0, 100, 100), (128, 0, 128)])
def test_reset_zeroes_every_index(state):
    with ring_of(128) as (seg, ring):
        ring.write_data(0, b"\xff" * 128)
        set_indices(seg, ring, *state)
        ring.reset()
        assert ring.indices == (0, 0, 0)
        assert ring.readable()[1] == 0
        assert ring.read_frame() is None
        assert ring.grant(128) == 0


def test_closed_segment_refuses_ring_access():
    with ring_of(64) as (seg, ring):
        pass
    with pytest.raises(ValueError):
        ring.grant(4)
    with pytest.raises(ValueError):
        ring.read_frame()


# --------------------------------------------------------------------------------------------
# Trap 10 / DECISIONS 5: the clamped inline threshold can never deadlock an empty ring
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [0, 1, 256, 4096, L.MAX_INLINE_LEN])
@pytest.mark.parametrize("cap", [64, 128, 192, 256, 512, 576, 1024, 65536, 1 << 20])
def test_effective_inline_threshold_clamp(header, cap):
    t = L.effective_inline_threshold(header, cap)
    assert 0 <= t <= (header or L.DEFAULT_INLINE_THRESHOLD)
    assert t <= L.MAX_INLINE_LEN
    assert entry_len(t) <= cap // 2, "an inline entry must never exceed capacity/2 (trap 10)"
    if t < (header or L.DEFAULT_INLINE_THRESHOLD):
        # Clamped by the ring: the clamp is not needlessly tight (one byte more would not fit).
        assert entry_len(t + 1) > cap // 2


def test_segment_reports_the_clamped_threshold():
    for cap in (64, 256, 1024):
        with ring_of(cap, inline_threshold=L.MAX_INLINE_LEN) as (seg, ring):
            assert seg.inline_threshold == L.effective_inline_threshold(L.MAX_INLINE_LEN, cap)
            assert entry_len(seg.inline_threshold) <= cap // 2


def test_trap10_largest_inline_entry_fits_an_empty_ring_at_every_position():
    # For every capacity 64..4096 and every index position X of an empty ring, the largest entry
    # the inline routing allows can be placed: reserve()'s non-mutating probe says yes and the
    # mutating write succeeds (algorithms.md 2.1 geometry caveat).
    placed = 0
    for cap in range(64, 4096 + 1, 64):
        for header in (0, L.MAX_INLINE_LEN):
            with ring_of(cap, inline_threshold=header) as (seg, ring):
                t = seg.inline_threshold
                assert t == L.effective_inline_threshold(header, cap)
                n = entry_len(t)
                sizes = sorted({t, max(t - 1, 0), max(t - 3, 0), max(t - 4, 0)}, reverse=True)
                for x in range(0, cap + 1, 4):
                    drive_to(ring, x)
                    assert ring.can_grant(n), f"cap {cap}: empty ring at {x} refuses a {n}-byte entry"
                    for k in sizes:
                        p = payload(k, seed=x)
                        assert ring.write_inline(p), f"cap {cap}: empty ring at {x} refuses payload {k}"
                        assert recv(ring) == p
                        assert ring.read_frame() is None
                    placed += 1
    assert placed > 4000


@pytest.mark.parametrize("cap", [64, 256, 1024])
def test_trap10_entries_above_half_capacity_can_stall_an_empty_ring(cap):
    # Why the clamp exists: one step above cap/2 there is a position X where an empty ring
    # refuses the entry to the non-mutating probe (reserve() would sleep forever).
    n = cap // 2 + 4
    stuck = []
    for_x = range(0, cap + 1, 4)
    with ring_of(cap) as (seg, ring):
        for x in for_x:
            drive_to(ring, x)
            if not ring.can_grant(n):
                stuck.append(x)
    assert stuck, "expected the geometry caveat to show"
    assert all(cap - x < n and x <= n for x in stuck)
    assert cap // 2 in stuck


def test_a_waiting_producer_is_woken_every_wake_batch_releases_or_when_the_ring_empties():
    """The consumer rings a producer that announced it sleeps once per wake_batch releases, or at
    once when it leaves the ring empty (docs/extensions.md, bit 0); a flag seen clear starts the
    count again."""
    with ring_of(4096) as (_, ring):
        assert ring.wake_batch == 16  # the default
        ring.wake_batch = 4
        for i in range(8):
            ring.send_inline(payload(8, i), False)
        ring.recv_inline(True)
        assert not ring.producer_waiting  # nobody waits: nothing to ring, no count kept
        ring.set_waiting(True, 1)  # the producer announced it sleeps
        rang = []
        for i in range(1, 8):
            assert ring.recv_inline(True) == payload(8, i)
            rang.append(ring.producer_waiting)
            if ring.producer_waiting:
                assert ring.waiting[0] == 0  # claimed: one ring per sleep
                ring.set_waiting(True, 1)  # it woke, and sleeps again
        assert rang == [False, False, False, True, False, False, True]  # the 4th; the 3rd after, which empties it
        ring.send_inline(payload(8), False)
        assert ring.recv_inline(True) == payload(8) and ring.producer_waiting  # empty again: at once
