"""The VarSlotPool (format-v7 1.6-1.7, algorithms.md 2.3, DECISIONS 8-9, traps 21-24)."""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub._native import NeedExtent
from shmhub.errors import DoubleFree, InvalidSlotRef, SegmentCorrupted, SlotError, StaleSlotRef

EMPTY = L.EMPTY_INDEX
CLASSES = ((64, 4), (256, 3), (1024, 2))
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=64, size_classes=CLASSES)


@pytest.fixture
def seg():
    s = Segment.create(CONFIG)
    yield s
    s.close()


@pytest.fixture
def pool(seg):
    return seg.pool


def all_counts(pool):
    return [pool.counts(c) for c in range(pool.num_classes)]


def drain_all(pool, owner=0):
    """Allocate every free slot of every class; returns the list of (class, extent, slot, gen)."""
    out = []
    for c in range(pool.num_classes):
        while (r := pool.alloc_in_class(c, owner)) is not None:
            out.append(r)
    return out


def assert_pool_consistent(pool, expect_allocated=()):
    """Every free slot is handed out exactly once by a drain, and nothing else (trap 21)."""
    allocated = {(c, e, s) for c, e, s, _ in expect_allocated}
    got = drain_all(pool, owner=7)
    keys = [(c, e, s) for c, e, s, _ in got]
    assert len(keys) == len(set(keys)), f"a slot was handed out twice: {sorted(keys)}"
    assert not (set(keys) & allocated), "an allocated slot was handed out again"
    total = sum(n for _, n in CLASSES)
    assert len(keys) + len(allocated) == total
    assert all(pool.alloc_in_class(c, 7) is None for c in range(pool.num_classes))
    for c, e, s, g in got:
        pool.free(c, e, s, g)


# --- format and initial state ---------------------------------------------------------------


def test_fresh_pool_header_and_free_lists(seg, pool):
    assert pool.num_classes == len(CLASSES)
    for c, (size, count) in enumerate(CLASSES):
        cl = seg.layout.classes[c]
        assert pool.class_info(c) == (size, count)
        # class header bytes as in format-v7 1.7
        assert seg.region.load_u32(cl.header_offset + L.CLS_SLOT_SIZE) == size
        assert seg.region.load_u32(cl.header_offset + L.CLS_SLOT_COUNT) == count
        assert seg.region.load_u64(cl.header_offset + L.CLS_FREE_HEAD) == 0  # tag 0, index 0
        # the rest is v7 padding; FEATURE_EXTENTS leaves it zero for a class that cannot grow
        # (extent_count and max_extents 0 read as 1)
        assert seg.region.read(cl.header_offset + L.CLS_EXTENT_COUNT, L.CLASS_HEADER_SIZE - L.CLS_EXTENT_COUNT) == bytes(48)
        assert seg.extent_count(c) == seg.max_extents(c) == pool.mapped_extents(c) == 1
        assert pool.free_head(c) == (0, 0)
        assert pool.counts(c) == (count, 0)
        for s in range(count):
            assert pool.slot_meta(c, s) == (0, L.SLOT_FREE, 0, s + 1 if s + 1 < count else EMPTY)


# --- allocation order and exhaustion --------------------------------------------------------


@pytest.mark.parametrize("size, cls", [(0, 0), (1, 0), (60, 0), (64, 0), (65, 1), (256, 1), (257, 2), (1024, 2)])
def test_alloc_picks_smallest_fitting_class(pool, size, cls):
    c, e, s, g = pool.alloc(size, 0)
    assert (c, e, s, g) == (cls, 0, 0, 1)  # the order free() and take() take
    assert pool.counts(cls)[1] == 1
    assert sum(a for _, a in all_counts(pool)) == 1


def test_alloc_larger_than_every_class_is_none(pool):
    assert pool.alloc(1025, 0) is None
    assert all_counts(pool) == [(n, 0) for _, n in CLASSES]


def test_alloc_spills_to_larger_classes_then_exhausts(pool):
    got = [pool.alloc(10, 3) for _ in range(9)]
    assert [r[0] for r in got] == [0] * 4 + [1] * 3 + [2] * 2
    assert len({(c, e, s) for c, e, s, _ in got}) == 9
    assert all(e == 0 for _, e, _, _ in got)  # v7 classes have one extent
    assert pool.alloc(10, 3) is None  # exhaustion is None, not an exception
    assert all_counts(pool) == [(0, n) for _, n in CLASSES]
    # a 100-byte request never falls back to the (smaller) class 0
    c, e, s, g = got[0]
    pool.free(c, e, s, g)
    assert pool.alloc(100, 3) is None
    assert pool.alloc(10, 3)[:3] == (c, e, s)


def test_alloc_does_not_fall_back_to_smaller_class(pool):
    for _ in range(3):
        assert pool.alloc(200, 0)[0] == 1
    assert [pool.alloc(200, 0)[0] for _ in range(2)] == [2, 2]
    assert pool.alloc(200, 0) is None
    assert pool.counts(0) == (4, 0)


def test_alloc_in_class_only_uses_that_class(pool):
    assert [pool.alloc_in_class(1, 0)[0] for _ in range(3)] == [1, 1, 1]
    assert pool.alloc_in_class(1, 0) is None
    assert pool.counts(0) == (4, 0) and pool.counts(2) == (2, 0)
    for bad in (-1, 3, 255):
        with pytest.raises(InvalidSlotRef):
            pool.alloc_in_class(bad, 0)


def test_alloc_records_owner_and_state(pool):
    c, e, s, g = pool.alloc(10, 5)
    gen, state, owner, _ = pool.slot_meta(c, s, e)
    assert (gen, state, owner) == (g, L.SLOT_ALLOCATED, 5)
    pool.free(c, e, s, g)
    gen, state, owner, _ = pool.slot_meta(c, s, e)
    assert (gen, state, owner) == (g, L.SLOT_FREE, 0)


def test_free_list_is_lifo(pool):
    refs = [pool.alloc_in_class(0, 0) for _ in range(3)]
    assert [r[:3] for r in refs] == [(0, 0, 0), (0, 0, 1), (0, 0, 2)]
    for r in (refs[1], refs[0], refs[2]):
        pool.free(*r)
    assert [pool.alloc_in_class(0, 0)[2] for _ in range(4)] == [2, 0, 1, 3]


# --- generations ----------------------------------------------------------------------------


def test_generation_increments_per_allocation(pool):
    gens = []
    for _ in range(5):
        c, e, s, g = pool.alloc_in_class(2, 0)
        assert (c, e, s) == (2, 0, 0)  # LIFO: the same slot every time
        assert pool.slot_meta(c, s)[0] == g
        gens.append(g)
        pool.free(c, e, s, g)
        assert pool.slot_meta(c, s)[0] == g  # free does not bump it (v7 bumps on allocate)
    assert gens == [1, 2, 3, 4, 5]
    # the other slot of the class was never allocated: still generation 0
    assert pool.slot_meta(2, 1)[0] == 0


def test_generation_wraps_from_u32_max(seg, pool):
    cl = seg.layout.classes[0]
    seg.region.store_u32(cl.meta_offset + L.META_GENERATION, L.U32_MAX)
    c, e, s, g = pool.alloc_in_class(0, 0)
    assert (e, s, g) == (0, 0, 0)  # wraps (algorithms.md 2.3)
    pool.free(c, e, s, g)
    assert pool.counts(0) == (4, 0)


# --- slot payload format (format-v7 1.6) ----------------------------------------------------


def test_slot_holds_length_prefix_then_payload(seg, pool):
    c, e, s, g = pool.alloc(64, 0)
    assert e == 0
    cl = seg.layout.classes[c]
    base = cl.data_offset + s * cl.slot_size
    payload = bytes(range(60))
    pool.write_payload(c, s, payload)
    assert seg.region.read(base, 4) == (60).to_bytes(4, "little")
    assert seg.region.read(base + 4, 60) == payload
    assert pool.payload_offset(c, s) == base + 4
    region, off = pool.payload_span(c, s, e)  # extent 0 lives in the segment's own mapping
    assert region is seg.region and off == base + 4
    assert pool.payload_len(c, s) == 60
    assert pool.read_payload(c, s) == payload


def test_largest_payload_is_slot_size_minus_4(pool):
    for c, (size, _) in enumerate(CLASSES):
        _, _, s, _ = pool.alloc_in_class(c, 0)
        pool.write_payload(c, s, b"\xab" * (size - 4))
        assert pool.read_payload(c, s) == b"\xab" * (size - 4)
        with pytest.raises(ValueError):
            pool.write_payload(c, s, b"\xcd" * (size - 3))
        with pytest.raises(ValueError):
            pool.set_payload_len(c, s, size - 3)
        # the failed writes left the slot as it was
        assert pool.read_payload(c, s) == b"\xab" * (size - 4)
        pool.set_payload_len(c, s, size - 4)
        assert pool.payload_len(c, s) == size - 4


def test_empty_payload(pool):
    c, e, s, g = pool.alloc(4, 0)
    pool.write_payload(c, s, b"")
    assert pool.payload_len(c, s) == 0 and pool.read_payload(c, s) == b""


@pytest.mark.parametrize("prefix", [61, 64, 0xFFFFFFFF])
def test_corrupt_length_prefix_is_rejected(seg, pool, prefix):
    # trap 4 / format-v7 1.6: payload_len > slot_size - 4 is refused, never read past the slot
    c, e, s, g = pool.alloc_in_class(0, 0)
    seg.region.write(pool.payload_offset(c, s) - 4, prefix.to_bytes(4, "little"))
    with pytest.raises(InvalidSlotRef):
        pool.payload_len(c, s)
    with pytest.raises(InvalidSlotRef):
        pool.read_payload(c, s)
    with pytest.raises(InvalidSlotRef):
        pool.take(c, e, s, g, 1)


# --- free: CAS keyed on the generation (DECISIONS 8, trap 21) -------------------------------


def test_double_free_raises_and_keeps_free_list_intact(pool):
    c, e, s, g = pool.alloc_in_class(0, 1)
    other = pool.alloc_in_class(0, 1)
    pool.free(c, e, s, g)
    head = pool.free_head(0)
    meta = pool.slot_meta(c, s)
    for _ in range(3):
        with pytest.raises(DoubleFree):
            pool.free(c, e, s, g)
    assert pool.free_head(0) == head  # nothing was pushed
    assert pool.slot_meta(c, s) == meta
    assert pool.counts(0) == (3, 1)
    assert_pool_consistent(pool, [other])


def test_stale_generation_free_raises_and_keeps_slot(pool):
    c, e, s, g1 = pool.alloc_in_class(1, 1)
    pool.free(c, e, s, g1)
    c2, e2, s2, g2 = pool.alloc_in_class(1, 2)
    assert (c2, e2, s2, g2) == (c, e, s, g1 + 1)
    head = pool.free_head(1)
    for stale in (g1, g2 + 1, 0):
        with pytest.raises(StaleSlotRef):
            pool.free(c, e, s, stale)
    # the current owner's allocation is untouched
    assert pool.slot_meta(c, s)[:3] == (g2, L.SLOT_ALLOCATED, 2)
    assert pool.free_head(1) == head
    assert pool.counts(1) == (2, 1)
    assert_pool_consistent(pool, [(c, e, s, g2)])
    pool.free(c, e, s, g2)
    assert pool.counts(1) == (3, 0)


def test_old_reference_to_a_free_slot_is_refused(pool):
    c, e, s, g1 = pool.alloc_in_class(0, 0)
    pool.free(c, e, s, g1)
    _, _, _, g2 = pool.alloc_in_class(0, 0)
    pool.free(c, e, s, g2)
    # the slot is free at g2; g1 is both stale and "not allocated": either typed error is right
    with pytest.raises((DoubleFree, StaleSlotRef)):
        pool.free(c, e, s, g1)
    assert pool.counts(0) == (4, 0)
    assert_pool_consistent(pool)


def test_bad_frees_never_hand_out_a_slot_twice(pool):
    # trap 21: after any mix of bad frees, every slot comes out of the pool exactly once
    live = drain_all(pool, owner=1)
    for c, e, s, g in live[::2]:
        pool.free(c, e, s, g)
    for c, e, s, g in live[::2]:
        with pytest.raises(DoubleFree):
            pool.free(c, e, s, g)
    for c, e, s, g in live[1::2]:
        with pytest.raises(StaleSlotRef):
            pool.free(c, e, s, g + 1)
        with pytest.raises(StaleSlotRef):
            pool.free(c, e, s, g - 1)
    assert_pool_consistent(pool, live[1::2])


def test_free_if_current_is_idempotent(pool):
    c, e, s, g = pool.alloc(10, 3)
    assert pool.free_if_current(c, e, s, g) is True
    head = pool.free_head(c)
    assert pool.free_if_current(c, e, s, g) is False
    assert pool.free_if_current(c, e, s, g) is False
    assert pool.free_head(c) == head
    # a stale reference is ignored too and leaves the new allocation alone
    _, e2, s2, g2 = pool.alloc_in_class(c, 4)
    assert (e2, s2) == (e, s)
    assert pool.free_if_current(c, e, s, g) is False
    assert pool.slot_meta(c, s)[:3] == (g2, L.SLOT_ALLOCATED, 4)
    assert pool.counts(c) == (3, 1)
    assert_pool_consistent(pool, [(c, e2, s2, g2)])


# --- bounds (trap 23) ------------------------------------------------------------------------

BAD_REFS = [
    pytest.param(3, 0, 0, id="class=num_classes"),
    pytest.param(255, 0, 0, id="class=255"),
    pytest.param(-1, 0, 0, id="class=-1"),
    pytest.param(0, 1, 0, id="extent=1"),
    pytest.param(0, 255, 0, id="extent=255"),
    pytest.param(0, -1, 0, id="extent=-1"),
    pytest.param(0, 0, 4, id="slot=count"),
    pytest.param(2, 0, 2, id="slot=count(class2)"),
    pytest.param(0, 0, 0xFFFFFFFF, id="slot=u32max"),
]


@pytest.mark.parametrize("c, e, s", BAD_REFS)
def test_out_of_range_refs_raise_invalid_slot_ref(pool, c, e, s):
    # trap 23: class, extent (below the class's max_extents: 1, i.e. only 0, for these v7
    # classes) and slot index are all bounds-checked
    live = pool.alloc_in_class(0, 1)  # slot 0 of class 0 is allocated with generation 1
    before = all_counts(pool)
    for call in (
        lambda: pool.free(c, e, s, 1),
        lambda: pool.free_if_current(c, e, s, 1),
        lambda: pool.take(c, e, s, 1, 2),
        lambda: pool.payload_len(c, s, e),
        lambda: pool.read_payload(c, s, e),
        lambda: pool.write_payload(c, s, b"x", e),
        lambda: pool.set_payload_len(c, s, 1, e),
        lambda: pool.payload_span(c, s, e),
        lambda: pool.slot_meta(c, s, e),
    ):
        with pytest.raises(InvalidSlotRef):
            call()
    if e == 0:
        for call in (
            lambda: pool.payload_len(c, s),
            lambda: pool.read_payload(c, s),
            lambda: pool.write_payload(c, s, b"x"),
            lambda: pool.set_payload_len(c, s, 1),
            lambda: pool.payload_offset(c, s),
            lambda: pool.slot_meta(c, s),
        ):
            with pytest.raises(InvalidSlotRef):
                call()
    assert all_counts(pool) == before
    assert pool.slot_meta(0, 0)[:3] == (1, L.SLOT_ALLOCATED, 1)
    assert_pool_consistent(pool, [live])


def test_extent_nonzero_with_valid_slot_does_not_free(pool):
    # trap 23: extent_idx is not ignored: (0, 1, 0, gen) must not free slot (0, 0, gen)
    c, e, s, g = pool.alloc_in_class(0, 1)
    assert e == 0
    with pytest.raises(InvalidSlotRef):
        pool.free(c, 1, s, g)
    with pytest.raises(InvalidSlotRef):
        pool.take(c, 1, s, g, 2)
    assert pool.slot_meta(c, s)[1:3] == (L.SLOT_ALLOCATED, 1)
    pool.free(c, e, s, g)


def test_invalid_slot_ref_is_a_slot_error():
    assert issubclass(InvalidSlotRef, SlotError)
    assert issubclass(DoubleFree, SlotError) and issubclass(StaleSlotRef, SlotError)


# --- take: ownership transfer (DECISIONS 9, trap 22) ----------------------------------------


def test_take_transfers_ownership(pool):
    c, e, s, g = pool.alloc(100, 1)  # sender: peer 1
    pool.write_payload(c, s, b"hello")
    assert pool.take(c, e, s, g, 0) == 5  # receiver: host becomes owner
    assert pool.slot_meta(c, s)[:3] == (g, L.SLOT_ALLOCATED, 0)
    assert pool.read_payload(c, s) == b"hello"
    assert pool.reclaim(1) == 0  # the dead sender no longer owns it
    assert pool.slot_meta(c, s)[1] == L.SLOT_ALLOCATED
    assert pool.reclaim(0) == 1
    assert pool.slot_meta(c, s)[1] == L.SLOT_FREE


def test_take_rechecks_generation(pool):
    c, e, s, g = pool.alloc_in_class(0, 1)
    pool.write_payload(c, s, b"old")
    pool.free(c, e, s, g)
    with pytest.raises(DoubleFree):  # freed: not allocated
        pool.take(c, e, s, g, 2)
    assert pool.slot_meta(c, s)[2] == 0
    _, e2, s2, g2 = pool.alloc_in_class(0, 3)
    assert (e2, s2) == (e, s)
    with pytest.raises(StaleSlotRef):  # reallocated: the old reference must not expose data
        pool.take(c, e, s, g, 2)
    # the new allocation's owner was not overwritten by the failed take
    assert pool.slot_meta(c, s)[:3] == (g2, L.SLOT_ALLOCATED, 3)
    with pytest.raises(StaleSlotRef):
        pool.take(c, e, s, g2 + 1, 2)
    assert pool.slot_meta(c, s)[2] == 3


# --- reclaim (crash recovery, algorithms.md 2.3) --------------------------------------------


def test_reclaim_frees_exactly_the_owners_slots(pool):
    refs = {}
    for i in range(9):
        owner = (0, 1, 2)[i % 3]
        refs.setdefault(owner, []).append(pool.alloc(10, owner))
    assert pool.alloc(10, 0) is None
    dead = refs[1]
    assert pool.reclaim(1) == len(dead) == 3
    for c, e, s, g in dead:
        assert pool.slot_meta(c, s, e)[:3] == (g, L.SLOT_FREE, 0)
    for owner in (0, 2):
        for c, e, s, g in refs[owner]:
            assert pool.slot_meta(c, s, e)[:3] == (g, L.SLOT_ALLOCATED, owner)
    assert sum(a for _, a in all_counts(pool)) == 6
    assert pool.reclaim(1) == 0  # idempotent
    assert pool.reclaim(9) == 0
    # the reclaimed slots are on the free lists exactly once
    again = [pool.alloc(10, 4) for _ in range(3)]
    assert sorted(r[:3] for r in again) == sorted(r[:3] for r in dead)
    assert pool.alloc(10, 4) is None
    # the references held by the dead peer are stale now
    for c, e, s, g in dead:
        with pytest.raises(StaleSlotRef):
            pool.free(c, e, s, g)


def test_reclaim_host_slots(pool):
    a = pool.alloc(10, 0)
    b = pool.alloc(10, 1)
    assert pool.reclaim(0) == 1
    ca, ea, sa, _ = a
    cb, eb, sb, _ = b
    assert pool.slot_meta(ca, sa, ea)[1] == L.SLOT_FREE
    assert pool.slot_meta(cb, sb, eb)[1] == L.SLOT_ALLOCATED


# --- ABA tag (trap 24) ------------------------------------------------------------------------


def test_aba_tag_never_resets_when_a_list_empties(pool):
    # trap 24: legacy v2 reset the tag to 0 when a free list went empty
    c = 0
    n = CLASSES[c][1]
    tags = [pool.free_head(c)[0]]
    for cycle in range(3):
        refs = []
        for _ in range(n):
            refs.append(pool.alloc_in_class(c, 0))
            tags.append(pool.free_head(c)[0])
        tag, idx = pool.free_head(c)
        assert idx == EMPTY
        assert tag == (2 * cycle + 1) * n  # one tag step per pop, carried through EMPTY
        assert pool.alloc_in_class(c, 0) is None
        assert pool.free_head(c) == (tag, EMPTY)  # a failed pop stores nothing
        for r in refs:
            pool.free(*r)
            tags.append(pool.free_head(c)[0])
        assert pool.free_head(c) == (2 * (cycle + 1) * n, refs[-1][2])
    assert tags == list(range(len(tags)))  # strictly rising by one per pop/push, never reset
    assert pool.counts(c) == (n, 0)


def test_free_head_encoding_in_segment(seg, pool):
    assert pool.alloc_in_class(1, 0) == (1, 0, 0, 1)
    raw = seg.region.load_u64(seg.layout.classes[1].header_offset + L.CLS_FREE_HEAD)
    assert raw == (1 << 32) | 1  # (aba_tag << 32) | slot_index
    assert pool.free_head(1) == (1, 1)


# --- concurrency (trap 21) ------------------------------------------------------------------


def _free_outcome(pool, ref):
    try:
        pool.free(*ref)
        return "won"
    except DoubleFree:
        return "double"
    except Exception as e:  # pragma: no cover - reported by the assertion
        return repr(e)


@pytest.mark.timeout(30)
def test_concurrent_double_free_threads_exactly_one_wins(pool):
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for i in range(300):
            ref = pool.alloc(10, 1)
            assert ref is not None
            barrier = threading.Barrier(2)
            results = []

            def worker():
                barrier.wait()
                results.append(_free_outcome(pool, ref))

            ts = [threading.Thread(target=worker) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert sorted(results) == ["double", "won"], f"iteration {i}: {results}"
            assert all_counts(pool) == [(n, 0) for _, n in CLASSES]
    finally:
        sys.setswitchinterval(old)
    assert_pool_consistent(pool)


def _fork(child_fn):
    """Run child_fn() in a forked child; returns (pid, read_fd) of a pipe carrying its JSON result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            data = json.dumps(child_fn()).encode()
            while data:
                data = data[os.write(w, data) :]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid, r):
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return json.loads(b"".join(chunks))


def _lockstep_frees(flags, me, pool, refs):
    """Free refs[i] only once the other process has also reached i (a per-reference barrier
    in shared memory), so both processes attempt each free at nearly the same moment."""
    other = 1 - me
    out = []
    for i, ref in enumerate(refs, 1):
        flags[8 * me : 8 * me + 8] = i.to_bytes(8, "little")
        spins = 0
        while int.from_bytes(flags[8 * other : 8 * other + 8], "little") < i:
            spins += 1
            if spins > 100:
                os.sched_yield()
        out.append(_free_outcome(pool, ref))
    return out


@pytest.mark.timeout(30)
def test_concurrent_double_free_processes_exactly_one_wins():
    # A real race (the native calls hold the GIL, so threads serialise): two processes free the
    # same references at the same moment. DECISIONS 8 / trap 21: each slot is pushed once.
    n = 1024
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=64, size_classes=((64, n),))
    with Segment.create(cfg) as seg:
        pool = seg.pool
        flags = mmap.mmap(-1, 16)
        try:
            for round_ in range(4):
                refs = drain_all(pool, owner=1)
                assert len(refs) == n
                flags[:] = bytes(16)
                pid, r = _fork(lambda: _lockstep_frees(flags, 1, pool, refs))
                mine = _lockstep_frees(flags, 0, pool, refs)
                theirs = _collect(pid, r)
                for i, (a, b) in enumerate(zip(mine, theirs)):
                    assert sorted((a, b)) == ["double", "won"], f"round {round_} slot {refs[i]}: {a}, {b}"
                assert pool.counts(0) == (n, 0)
                tag, _ = pool.free_head(0)
                assert tag == (4 * round_ + 2) * n  # one step per pop and per push, nothing more
                again = drain_all(pool, owner=2)
                assert sorted(s for _, _, s, _ in again) == list(range(n)), "free list corrupted"
                for c, e, s, g in again:
                    pool.free(c, e, s, g)
        finally:
            flags.close()


def test_second_mapping_sees_allocations(seg):
    # Two mappings of one segment (host and guest) share the pool.
    with Segment.attach(seg.fd) as guest:
        c, e, s, g = seg.pool.alloc(10, 0)
        seg.pool.write_payload(c, s, b"shared", e)
        assert guest.pool.take(c, e, s, g, 1) == 6
        assert guest.pool.read_payload(c, s, e) == b"shared"
        assert seg.pool.slot_meta(c, s, e)[2] == 1
        guest.pool.free(c, e, s, g)
        assert seg.pool.counts(c) == (CLASSES[c][1], 0)
        with pytest.raises(DoubleFree):
            seg.pool.free(c, e, s, g)


# --- growable classes (FEATURE_EXTENTS, docs/extensions.md bit 2) ----------------------------

GROW_CLASSES = ((64, 2), (256, 3, 3))  # class 1: 3 slots per extent, at most 3 extents
GROW = SegmentConfig(max_guests=1, bipbuf_capacity=64, size_classes=GROW_CLASSES)


@pytest.fixture
def gseg():
    s = Segment.create(GROW)
    yield s
    s.close()


def class_header(seg, c):
    h = seg.layout.classes[c].header_offset
    r = seg.region
    return {
        "extent_count": r.load_u32(h + L.CLS_EXTENT_COUNT),
        "max_extents": r.load_u32(h + L.CLS_MAX_EXTENTS),
        "offsets": [r.load_u64(h + L.CLS_EXTENT_OFFSETS + 8 * i) for i in range(L.MAX_EXTENTS - 1)],
        "grow_request": r.load_u32(h + L.CLS_GROW_REQUEST),
    }


def test_growable_class_starts_with_one_extent(gseg):
    pool = gseg.pool
    assert gseg.config == GROW
    assert class_header(gseg, 1) == {"extent_count": 1, "max_extents": 3, "offsets": [0] * 4, "grow_request": 0}
    assert gseg.extent_count(1) == pool.mapped_extents(1) == 1 and gseg.max_extents(1) == 3
    assert pool.class_info(1) == (256, 3)  # slot_count is per extent
    assert pool.counts(1) == (3, 0)
    # class 0 cannot grow: its header padding stays zero
    h0 = gseg.layout.classes[0].header_offset
    assert gseg.region.read(h0 + L.CLS_EXTENT_COUNT, L.CLASS_HEADER_SIZE - L.CLS_EXTENT_COUNT) == bytes(48)
    # an extent below the maximum but not mapped (not even published) is NeedExtent, one at or
    # beyond the maximum is simply invalid; neither changes anything
    for call in (
        lambda: pool.free(1, 1, 0, 1),
        lambda: pool.take(1, 2, 0, 1, 0),
        lambda: pool.slot_meta(1, 0, 1),
        lambda: pool.read_payload(1, 0, 2),
        lambda: pool.write_payload(1, 0, b"x", 1),
    ):
        with pytest.raises(NeedExtent):
            call()
    for call in (
        lambda: pool.free(1, 3, 0, 1),
        lambda: pool.take(1, 3, 0, 1, 0),
        lambda: pool.slot_meta(1, 0, 3),
        lambda: pool.free(1, L.MAX_EXTENTS, 0, 1),
        lambda: pool.free(0, 1, 0, 1),
        lambda: pool.free(1, 1, 3, 1),
    ):
        with pytest.raises(InvalidSlotRef):
            call()
    assert all_counts(pool) == [(2, 0), (3, 0)]
    assert pool.free_head(1) == (0, 0)


def test_alloc_across_extents(gseg):
    pool, c = gseg.pool, 1
    first = [pool.alloc_in_class(c, 1) for _ in range(3)]
    assert first == [(c, 0, s, 1) for s in range(3)]
    assert pool.alloc_in_class(c, 1) is None and pool.alloc(200, 1) is None
    tag = pool.free_head(c)[0]

    assert gseg.grow_class(c) is True
    hdr = class_header(gseg, c)
    off = hdr["offsets"][0]
    data_off, ext_size = L.extent_layout(256, 3)
    assert hdr["extent_count"] == 2 and hdr["offsets"][1:] == [0, 0, 0]
    assert off % L.EXTENT_ALIGN == 0 and off >= gseg.total_size
    assert gseg.current_size == gseg.file_size == off + ext_size
    assert gseg.extent_count(c) == pool.mapped_extents(c) == 2
    # counts cover every mapped extent; the new extent's slots are all on the one free list,
    # under global indices extent * slot_count + slot
    assert pool.counts(c) == (3, 3)
    assert pool.free_head(c) == (tag + 1, 3)  # one push for the whole extent
    assert [pool.slot_meta(c, s, 1) for s in range(3)] == [(0, L.SLOT_FREE, 0, 4), (0, L.SLOT_FREE, 0, 5), (0, L.SLOT_FREE, 0, EMPTY)]

    second = [pool.alloc(200, 2) for _ in range(3)]
    assert second == [(c, 1, s, 1) for s in range(3)]  # (class, extent, slot, generation)
    assert pool.alloc(200, 2) is None
    assert pool.counts(c) == (0, 6)

    # payloads of extent 1 live in its own mapping and do not alias extent 0's slots
    pool.write_payload(c, 0, b"extent zero", 0)
    pool.write_payload(c, 0, b"extent one!", 1)
    assert pool.read_payload(c, 0, 0) == b"extent zero" and pool.read_payload(c, 0, 1) == b"extent one!"
    region, poff = pool.payload_span(c, 0, 1)
    assert region is not gseg.region
    assert region.read(poff - 4, 4 + 11) == (11).to_bytes(4, "little") + b"extent one!"
    assert poff - 4 == data_off  # slot 0 of the extent starts at its data offset
    r0, poff0 = pool.payload_span(c, 0, 0)
    assert r0 is gseg.region and poff0 == pool.payload_offset(c, 0)
    pool.set_payload_len(c, 0, 6, 1)
    assert pool.payload_len(c, 0, 1) == 6 and pool.read_payload(c, 0, 1) == b"extent"
    assert pool.payload_len(c, 0, 0) == 11

    # take / free round trip in the new extent, with the generation check
    pool.write_payload(c, 1, b"hi", 1)
    assert pool.take(c, 1, 1, 1, 0) == 2
    assert pool.slot_meta(c, 1, 1)[:3] == (1, L.SLOT_ALLOCATED, 0)
    assert pool.slot_meta(c, 1, 0)[:3] == (1, L.SLOT_ALLOCATED, 1)  # same slot_idx, other extent: untouched
    pool.free(c, 1, 1, 1)
    assert pool.free_head(c)[1] == 1 * 3 + 1
    assert pool.counts(c) == (1, 5)
    with pytest.raises(DoubleFree):
        pool.free(c, 1, 1, 1)
    assert pool.alloc_in_class(c, 4) == (c, 1, 1, 2)
    with pytest.raises(StaleSlotRef):
        pool.take(c, 1, 1, 1, 0)
    assert pool.slot_meta(c, 1, 1)[:3] == (2, L.SLOT_ALLOCATED, 4)

    # crash recovery covers every extent
    assert pool.reclaim(2) == 2  # (1, 1, 0) and (1, 1, 2)
    assert pool.reclaim(1) == 3  # extent 0
    assert pool.counts(c) == (5, 1)

    # up to max_extents, then no more
    assert gseg.grow_class(c) is True
    assert gseg.grow_class(c) is False
    assert gseg.extent_count(c) == pool.mapped_extents(c) == 3
    assert pool.counts(c) == (8, 1)
    got = drain_all(pool, owner=5)
    expected = [(0, 0, 0), (0, 0, 1)] + [(c, e, s) for e in range(3) for s in range(3) if (e, s) != (1, 1)]
    assert sorted(r[:3] for r in got) == expected
    assert pool.counts(c) == (0, 9)
    for r in got:
        pool.free(*r)
    with pytest.raises(InvalidSlotRef):
        pool.free(c, 3, 0, 1)


def test_grow_pushes_the_extent_above_the_free_slots(gseg):
    pool, c = gseg.pool, 1
    assert pool.alloc_in_class(c, 1) == (c, 0, 0, 1)
    assert gseg.grow_class(c)
    # the extent's last slot links to the old head (global index 1 = extent 0, slot 1)
    assert pool.slot_meta(c, 2, 1)[3] == 1
    assert pool.free_head(c) == (2, 3)
    order = [pool.alloc_in_class(c, 1)[:3] for _ in range(5)]
    assert order == [(c, 1, 0), (c, 1, 1), (c, 1, 2), (c, 0, 1), (c, 0, 2)]
    assert pool.alloc_in_class(c, 1) is None


def test_other_mappings_map_new_extents_on_demand(gseg):
    pool, c = gseg.pool, 1
    with Segment.attach(gseg.fd) as guest, Segment.attach(gseg.fd) as guest2:
        assert guest.pool.mapped_extents(c) == 1
        for _ in range(3):
            pool.alloc_in_class(c, 0)
        assert gseg.grow_class(c)
        ref = pool.alloc_in_class(c, 0)
        assert ref == (c, 1, 0, 1)
        pool.write_payload(c, 0, b"grown", 1)
        # the raw pool refuses before touching anything; Segment.take maps the extent and retries
        with pytest.raises(NeedExtent):
            guest.pool.take(*ref, 1)
        assert pool.slot_meta(c, 0, 1)[:3] == (1, L.SLOT_ALLOCATED, 0)
        assert guest.take(*ref, 1) == 5
        assert guest.pool.mapped_extents(c) == 2
        assert guest.pool.read_payload(c, 0, 1) == b"grown"
        assert pool.slot_meta(c, 0, 1)[:3] == (1, L.SLOT_ALLOCATED, 1)
        # the free list's head is in extent 1: the second guest's raw pop refuses, Segment.alloc maps
        with pytest.raises(NeedExtent):
            guest2.pool.alloc(200, 2)
        assert pool.counts(c) == (2, 4)
        assert guest2.alloc(200, 2) == (c, 1, 1, 1)
        assert guest2.pool.counts(c) == pool.counts(c) == (1, 5)
        # a reference to an extent below the maximum that was never published is corruption
        with pytest.raises(SegmentCorrupted):
            guest.take(c, 2, 0, 1, 1)
        guest2.pool.free(c, 1, 1, 1)
        guest.pool.free(*ref)
    assert pool.counts(c) == (3, 3)
