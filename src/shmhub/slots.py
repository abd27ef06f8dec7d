"""The VarSlotPool's Python face: slot references and opening the pool of a segment."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import layout as L
from ._native import Region, SlotPool


class SlotRef(NamedTuple):
    class_idx: int
    extent_idx: int
    slot_idx: int
    generation: int


def open_pool(region: Region, layout: L.Layout, journal: bool = False) -> SlotPool:
    """The native pool over the classes of `layout` (ranges checked against the mapping).
    `journal`: guests record free-list operations in their peer entries (FEATURE_POOL_JOURNAL)."""
    journals = (layout.peer_table_offset, layout.max_guests) if journal else None
    return SlotPool(region, [(c.slot_size, c.slot_count, c.header_offset, c.meta_offset, c.data_offset, c.max_extents) for c in layout.classes], journals)


def pool_stats(pool: SlotPool) -> list[dict[str, Any]]:  # ints; callers (inspect) add fields of other types
    """Per-class slot_size, slot_count, free and allocated counts."""
    out = []
    for c in range(pool.num_classes):
        size, count = pool.class_info(c)
        free, allocated = pool.counts(c)
        out.append({"class": c, "slot_size": size, "slot_count": count, "free": free, "allocated": allocated})
    return out
