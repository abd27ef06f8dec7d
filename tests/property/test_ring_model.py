"""Stateful model test of one BipBuffer ring against a reference FIFO (algorithms.md 2.1-2.2).

The model keeps the frames in flight (with the offset each one was placed at) and its own copy of
the three indices, advanced by a transcription of algorithms.md 2.1. After every step the ring's
indices must equal the model's, every frame in flight must still be intact in shared memory (a
grant over unread data, trap 2, shows up here), and the index arithmetic must account for exactly
the bytes in flight. A refused write must be one the free space really cannot hold.
"""

from __future__ import annotations

from collections import deque

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from shmhub import Segment, SegmentConfig
from shmhub import _native
from shmhub import layout as L

INLINE, SLOT, MMAP = L.KIND_INLINE, L.KIND_SLOT_REF, L.KIND_MMAP_REF
U8, U32, U64 = st.integers(0, 255), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)


def entry_len(payload_len: int) -> int:
    return (L.FRAME_HEADER_SIZE + payload_len + 3) & ~3


def make_payload(seq: int, n: int) -> bytes:
    # Distinct per frame and never zero, so a mix-up or a padding leak cannot go unnoticed.
    return bytes(1 + (seq * 37 + i * 11) % 251 for i in range(n))


class RingMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.seg = None

    @initialize(cap=st.sampled_from([64, 128, 192, 256, 320, 512]))
    def open_ring(self, cap):
        cfg = SegmentConfig(max_guests=1, bipbuf_capacity=cap, size_classes=((64, 1),))
        self.seg = Segment.create(cfg)
        self.ring = self.seg.g2h(1)
        self.cap = cap
        self.w = self.wm = self.r = 0  # the model's indices
        self.fifo = deque()  # (offset, total_len, expected frame tuple, raw bytes)
        self.seq = 0
        self.refused = 0

    def teardown(self):
        if self.seg is not None:
            self.seg.close()

    # -- the model: algorithms.md 2.1 -----------------------------------------------------

    def free_space(self) -> int:
        """Largest entry the producer may place now without write reaching read (trap 2)."""
        w, r = self.w, self.r
        if w < r:  # wrapped: only [w, r) minus one, since write may never land on read
            return r - w - 1
        front = r - 1 if r > 0 else 0  # wrapping needs read > 0 and the front is [0, read)
        return max(self.cap - w, front)

    def model_grant(self, n: int):
        w, r, cap = self.w, self.r, self.cap
        if w >= r:
            if cap - w >= n:
                return w
            if r == 0:
                return None
            self.wm, self.w = w, 0  # the wrap is kept even if the front is too small (trap 3)
            return 0 if n < r else None
        return w if w + n < r else None

    def model_readable(self):
        if self.wm:
            if self.r < self.wm:
                return self.r, self.wm - self.r
            self.r = self.wm = 0
            return 0, self.w
        return self.r, self.w - self.r

    def model_release(self, n: int):
        nr = self.r + n
        assert nr <= self.cap
        if self.wm and nr >= self.wm:
            self.r = self.wm = 0
        else:
            self.r = nr

    def produce(self, n: int, write, expect, raw: bytes):
        assert len(raw) == n
        placeable = n <= self.free_space()
        off = self.model_grant(n)
        assert (off is not None) == placeable, "model transcription disagrees with its own free-space rule"
        ok = write()
        assert ok == placeable, f"write of {n} bytes: ring said {ok}, free space {self.free_space()} at {self.ring.indices}"
        if ok:
            self.w += n
            self.fifo.append((off, n, expect, raw))
            self.seq += 1
        else:
            self.refused += 1

    # -- producer rules -------------------------------------------------------------------

    @rule(size=st.one_of(st.integers(0, 24), st.integers(0, 512)))
    def write_inline(self, size):
        n = size % (self.cap - 7)  # payload 0..cap-8: up to exact-capacity entries
        p = make_payload(self.seq, n)
        self.produce(entry_len(n), lambda: self.ring.write_inline(p), (INLINE, entry_len(n), p), _native.encode_inline(p))

    @rule(where=st.sampled_from(["tail", "front"]), delta=st.sampled_from([-4, 0, 4]))
    def write_at_boundary(self, where, delta):
        # Entries exactly as large as the space the algorithm allows, and 4 bytes more: the
        # exact-capacity grant, the exact fit at the end, the strict `<` of a wrap (trap 2).
        w, r = self.w, self.r
        if w < r:
            limit = r - w - 4
        elif where == "tail":
            limit = self.cap - w
        else:
            limit = r - 4  # forces a wrap when the tail is smaller
        n = limit + delta
        if not L.FRAME_HEADER_SIZE <= n <= self.cap:
            return
        p = make_payload(self.seq, n - 8)
        self.produce(n, lambda: self.ring.write_inline(p), (INLINE, n, p), _native.encode_inline(p))

    @rule(cls=U8, ext=U8, slot=U32, gen=U32)
    def write_slot_ref(self, cls, ext, slot, gen):
        raw = _native.encode_slot_ref(cls, ext, slot, gen)
        self.produce(20, lambda: self.ring.write_slot_ref(cls, ext, slot, gen), (SLOT, 20, cls, ext, slot, gen), raw)

    @rule(map_id=U32, gen=U32, off=U64, plen=U32)
    def write_mmap_ref(self, map_id, gen, off, plen):
        raw = _native.encode_mmap_ref(map_id, gen, off, plen)
        self.produce(32, lambda: self.ring.write_mmap_ref(map_id, gen, off, plen), (MMAP, 32, map_id, gen, off, plen), raw)

    @rule(n=st.integers(0, 1 << 16))
    def probe_can_grant(self, n):
        n %= self.cap + 1
        before = self.ring.indices
        assert self.ring.can_grant(n) == (n == 0 or n <= self.free_space())
        assert self.ring.indices == before, "can_grant must not store anything"

    # -- consumer rules -------------------------------------------------------------------

    @rule()
    def read_and_release(self):
        start, avail = self.model_readable()
        got = self.ring.read_frame()
        if not self.fifo:
            assert avail == 0
            assert got is None, f"the model's ring is empty but read_frame returned {got}"
            return
        off, n, expect, _raw = self.fifo[0]
        assert (start, avail >= n) == (off, True)
        assert got == expect, "frames must come out in FIFO order with identical content"
        # Reading does not consume: a second look sees the same frame.
        assert self.ring.read_frame() == expect
        self.ring.release(n)
        self.model_release(n)
        self.fifo.popleft()

    @rule()
    def recv_inline(self):
        start, avail = self.model_readable()
        got = self.ring.recv_inline()
        if not self.fifo:
            assert avail == 0 and got is None
            return
        off, n, expect, _raw = self.fifo[0]
        assert start == off and avail >= n
        if expect[0] == INLINE:
            assert got == expect[2]
            self.model_release(n)
            self.fifo.popleft()
        else:
            assert got == expect  # ref frames are handed back unreleased

    @rule()
    def drain(self):
        while self.fifo:
            self.read_and_release()
        self.read_and_release()  # and then it is empty

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def indices_match_the_model(self):
        if self.seg is None:
            return
        assert self.ring.indices == (self.w, self.wm, self.r)

    @invariant()
    def indices_are_well_formed(self):
        if self.seg is None:
            return
        w, wm, r = self.w, self.wm, self.r
        assert 0 <= w <= self.cap and 0 <= r <= self.cap and 0 <= wm <= self.cap
        if wm == 0:
            assert r <= w
        else:
            assert w < r <= wm, "after a wrap write must stay strictly below read (trap 2)"

    @invariant()
    def bytes_in_flight_are_intact(self):
        if self.seg is None:
            return
        w, wm, r = self.w, self.wm, self.r
        in_flight = sum(n for _, n, _, _ in self.fifo)
        assert in_flight == ((wm - r) + w if wm else w - r)
        assert in_flight <= self.cap
        spans = sorted((off, off + n) for off, n, _, _ in self.fifo)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            assert end <= start, "two frames in flight overlap"
        for off, n, _, raw in self.fifo:
            assert self.ring.read_data(off, n) == raw, "a frame in flight was overwritten"


TestRingModel = RingMachine.TestCase
TestRingModel.settings = settings(
    max_examples=250,
    stateful_step_count=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_model_covers_wraps_refusals_and_exact_capacity():
    # A fixed scenario showing the machine's rules reach the cases it exists for (not random).
    m = RingMachine()
    try:
        m.open_ring(64)
        m.write_at_boundary("tail", 0)  # exact-capacity entry
        assert m.ring.indices == (64, 0, 0)
        m.write_inline(0)  # refused: full, read == 0
        m.read_and_release()
        m.write_inline(12)  # 20 bytes: empty ring at 64 wraps to the front
        assert m.ring.indices == (20, 64, 64)
        m.write_at_boundary("front", 4)  # exactly read - write: refused (trap 2)
        m.recv_inline()
        m.drain()
        assert m.refused == 2
        m.indices_match_the_model()
        m.indices_are_well_formed()
        m.bytes_in_flight_are_intact()
    finally:
        m.teardown()
