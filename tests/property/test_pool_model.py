"""A stateful model test of the VarSlotPool (algorithms.md 2.3, DECISIONS 8-9, traps 21-24).

The model is exact: v7 free lists are Treiber stacks (LIFO) with an ABA tag that steps once per
successful pop or push, so the model predicts which slot every allocation returns, every free-list
head, every slot's generation/state/owner and every next_free link.

Class 1 is growable (FEATURE_EXTENTS): `grow` appends an extent, whose slots are pushed onto the
class's one free list under global indices extent * slot_count + slot, in a single push."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub._native import NeedExtent
from shmhub.errors import DoubleFree, InvalidSlotRef, StaleSlotRef

EMPTY = L.EMPTY_INDEX
CLASSES = ((64, 3), (128, 2, 3), (256, 2))  # class 1 may grow to 3 extents of 2 slots
CONFIG = SegmentConfig(max_guests=3, bipbuf_capacity=64, size_classes=CLASSES)
OWNERS = st.integers(0, 3)


def max_extents(c):
    return CLASSES[c][2] if len(CLASSES[c]) > 2 else 1


class Slot:
    __slots__ = ("gen", "allocated", "owner", "payload")

    def __init__(self):
        self.gen = 0
        self.allocated = False
        self.owner = 0
        self.payload = None


class PoolModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.seg = Segment.create(CONFIG)
        self.pool = self.seg.pool
        self.extents = [1] * len(CLASSES)  # extents published (and mapped here) per class
        self.slots = {(c, 0, s): Slot() for c, (_, n, *_) in enumerate(CLASSES) for s in range(n)}
        # free stacks of global indices (extent * slot_count + slot), top = last element;
        # a fresh pool pops 0, 1, 2, ...
        self.stacks = [list(range(n - 1, -1, -1)) for _, n, *_ in CLASSES]
        self.tags = [0] * len(CLASSES)
        self.refs = []  # every reference ever handed out: (class, extent, slot, generation)
        self.gens_seen = {}
        self.counter = 0

    def teardown(self):
        self.seg.close()

    # -- model helpers ---------------------------------------------------------------------

    def _pop(self, c, owner):
        e, s = divmod(self.stacks[c].pop(), CLASSES[c][1])
        self.tags[c] += 1
        slot = self.slots[(c, e, s)]
        assert not slot.allocated
        slot.gen = (slot.gen + 1) & 0xFFFFFFFF
        slot.allocated = True
        slot.owner = owner
        slot.payload = None
        return (c, e, s, slot.gen)

    def _push(self, c, e, s):
        slot = self.slots[(c, e, s)]
        slot.allocated = False
        slot.owner = 0
        self.stacks[c].append(e * CLASSES[c][1] + s)
        self.tags[c] += 1

    def _live(self, ref):
        slot = self.slots[ref[:3]]
        return slot.allocated and slot.gen == ref[3]

    def live_refs(self):
        return [r for r in self.refs if self._live(r)]

    def double_refs(self):
        # the slot's current generation, but it has been freed
        return [r for r in self.refs if not self.slots[r[:3]].allocated and self.slots[r[:3]].gen == r[3]]

    def stale_refs(self):
        # an older generation of a slot that is allocated again
        return [r for r in self.refs if self.slots[r[:3]].allocated and self.slots[r[:3]].gen != r[3]]

    def old_free_refs(self):
        return [r for r in self.refs if not self.slots[r[:3]].allocated and self.slots[r[:3]].gen != r[3]]

    def _record(self, ref):
        c, e, s, g = ref
        seen = self.gens_seen.setdefault((c, e, s), [])
        assert not seen or g > seen[-1], f"generation of slot {(c, e, s)} did not increase: {seen} then {g}"
        seen.append(g)
        self.refs.append(ref)

    # -- rules -----------------------------------------------------------------------------

    @rule(size=st.integers(0, 300), owner=OWNERS, write=st.booleans())
    def alloc(self, size, owner, write):
        expected = None
        for c, (slot_size, *_) in enumerate(CLASSES):
            if slot_size >= size and self.stacks[c]:
                expected = self._pop(c, owner)
                break
        got = self.pool.alloc(size, owner)
        assert got == expected, f"alloc({size}) returned {got}, model says {expected}"
        if got is None:
            return
        c, e, s, g = got
        assert CLASSES[c][0] >= size  # the slot holds what was asked for
        self._record(got)
        if write:
            self.counter += 1
            n = min(size, CLASSES[c][0] - 4)
            payload = bytes((self.counter + i) & 0xFF for i in range(n))
            self.pool.write_payload(c, s, payload, e)
            self.slots[(c, e, s)].payload = payload

    @rule(c=st.integers(0, len(CLASSES) - 1), owner=OWNERS)
    def alloc_in_class(self, c, owner):
        expected = self._pop(c, owner) if self.stacks[c] else None
        got = self.pool.alloc_in_class(c, owner)
        assert got == expected
        if got is not None:
            self._record(got)

    @precondition(lambda self: self.live_refs())
    @rule(data=st.data())
    def free(self, data):
        c, e, s, g = data.draw(st.sampled_from(self.live_refs()))
        self.pool.free(c, e, s, g)
        self._push(c, e, s)

    @precondition(lambda self: self.double_refs())
    @rule(data=st.data())
    def double_free(self, data):
        # DECISIONS 8: raises, and the free list is untouched (the invariants check it)
        c, e, s, g = data.draw(st.sampled_from(self.double_refs()))
        with pytest.raises(DoubleFree):
            self.pool.free(c, e, s, g)

    @precondition(lambda self: self.stale_refs())
    @rule(data=st.data())
    def stale_free(self, data):
        c, e, s, g = data.draw(st.sampled_from(self.stale_refs()))
        with pytest.raises(StaleSlotRef):
            self.pool.free(c, e, s, g)

    @precondition(lambda self: self.old_free_refs())
    @rule(data=st.data())
    def old_ref_to_free_slot(self, data):
        c, e, s, g = data.draw(st.sampled_from(self.old_free_refs()))
        with pytest.raises((DoubleFree, StaleSlotRef)):
            self.pool.free(c, e, s, g)

    @precondition(lambda self: self.refs)
    @rule(data=st.data())
    def free_if_current(self, data):
        ref = data.draw(st.sampled_from(self.refs))
        live = self._live(ref)
        assert self.pool.free_if_current(*ref) is live
        if live:
            self._push(*ref[:3])

    @precondition(lambda self: self.refs)
    @rule(data=st.data(), new_owner=OWNERS)
    def take(self, data, new_owner):
        # DECISIONS 9: the receiver becomes the owner; a dead reference never does
        c, e, s, g = ref = data.draw(st.sampled_from(self.refs))
        slot = self.slots[(c, e, s)]
        if self._live(ref):
            if slot.payload is None:
                self.pool.write_payload(c, s, b"", e)
                slot.payload = b""
            assert self.pool.take(c, e, s, g, new_owner) == len(slot.payload)
            assert self.pool.read_payload(c, s, e) == slot.payload
            slot.owner = new_owner
        elif slot.allocated:
            with pytest.raises(StaleSlotRef):
                self.pool.take(c, e, s, g, new_owner)
        elif slot.gen == g:
            with pytest.raises(DoubleFree):
                self.pool.take(c, e, s, g, new_owner)
        else:
            with pytest.raises((DoubleFree, StaleSlotRef)):
                self.pool.take(c, e, s, g, new_owner)

    @rule(owner=OWNERS)
    def reclaim(self, owner):
        # crash recovery: exactly the owner's allocated slots, in class, extent, slot order
        expected = 0
        for c, (_, n, *_) in enumerate(CLASSES):
            for e in range(self.extents[c]):
                for s in range(n):
                    slot = self.slots[(c, e, s)]
                    if slot.allocated and slot.owner == owner:
                        self._push(c, e, s)
                        expected += 1
        assert self.pool.reclaim(owner) == expected

    @rule(c=st.integers(0, len(CLASSES) - 1))
    def grow(self, c):
        # FEATURE_EXTENTS: the new extent's slots, chained in order, go on top of the free list
        # in one push; a class at its maximum (or a v7 class) does not grow
        can = self.extents[c] < max_extents(c)
        assert self.seg.grow_class(c) is can
        if not can:
            return
        e, n = self.extents[c], CLASSES[c][1]
        self.extents[c] += 1
        for s in range(n):
            self.slots[(c, e, s)] = Slot()
        self.stacks[c].extend(range(e * n + n - 1, e * n - 1, -1))
        self.tags[c] += 1

    @rule(
        c=st.integers(-1, 255),
        e=st.integers(-1, L.MAX_EXTENTS),
        s=st.integers(0, 5),
        g=st.integers(0, 50),
    )
    def invalid_ref(self, c, e, s, g):
        # trap 23: out-of-range class, extent or slot is refused before anything is touched; an
        # extent below the class's maximum that is not mapped yet is NeedExtent, also untouched
        in_range = 0 <= c < len(CLASSES) and 0 <= e < max_extents(c) and s < CLASSES[c][1]
        if in_range and e < self.extents[c]:
            return
        exc = NeedExtent if in_range else InvalidSlotRef
        for call in (self.pool.free, self.pool.free_if_current):
            with pytest.raises(exc):
                call(c, e, s, g)
        with pytest.raises(exc):
            self.pool.take(c, e, s, g, 1)

    @precondition(lambda self: self.live_refs())
    @rule(data=st.data())
    def read_back(self, data):
        c, e, s, g = data.draw(st.sampled_from(self.live_refs()))
        payload = self.slots[(c, e, s)].payload
        if payload is not None:
            assert self.pool.read_payload(c, s, e) == payload

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def counts_match(self):
        for c, (_, n, *_) in enumerate(CLASSES):
            free = len(self.stacks[c])
            assert self.pool.mapped_extents(c) == self.seg.extent_count(c) == self.extents[c]
            assert self.pool.counts(c) == (free, n * self.extents[c] - free)

    @invariant()
    def free_lists_match(self):
        # head, ABA tag (never reset, trap 24) and every link of each stack (global indices)
        for c, stack in enumerate(self.stacks):
            n = CLASSES[c][1]
            assert self.pool.free_head(c) == (self.tags[c], stack[-1] if stack else EMPTY)
            for i, gi in enumerate(stack):
                e, s = divmod(gi, n)
                assert self.pool.slot_meta(c, s, e)[3] == (stack[i - 1] if i else EMPTY)

    @invariant()
    def slot_meta_matches(self):
        for (c, e, s), slot in self.slots.items():
            gen, state, owner, _ = self.pool.slot_meta(c, s, e)
            assert gen == slot.gen
            assert state == (L.SLOT_ALLOCATED if slot.allocated else L.SLOT_FREE)
            assert owner == (slot.owner if slot.allocated else 0)

    @invariant()
    def no_slot_handed_out_twice(self):
        live = self.live_refs()
        assert len({r[:3] for r in live}) == len(live)
        for c, stack in enumerate(self.stacks):
            n = CLASSES[c][1]
            assert len(set(stack)) == len(stack)
            assert not any(self.slots[(c, *divmod(gi, n))].allocated for gi in stack)


PoolModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_pool_model = PoolModel.TestCase
