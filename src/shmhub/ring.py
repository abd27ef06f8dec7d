"""Ring entries (format-v7 1.5) as named tuples, over the native BipBuffer and frame codec."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, NamedTuple, Union

from . import _native
from . import layout as L
from ._native import Ring, encode_inline, encode_mmap_ref, encode_slot_ref

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

    from ._native import FrameTuple

__all__ = ["Ring", "InlineFrame", "SlotRefFrame", "MmapRefFrame", "Frame", "decode_frame", "encode_frame"]


class InlineFrame(NamedTuple):
    total_len: int
    payload: bytes


class SlotRefFrame(NamedTuple):
    total_len: int
    class_idx: int
    extent_idx: int
    slot_idx: int
    generation: int


class MmapRefFrame(NamedTuple):
    total_len: int
    map_id: int
    map_generation: int
    map_offset: int
    payload_len: int
    flags: int = 0  # MR_FLAGS: MR_RETURN for a return ref (FEATURE_MMAP_RETURN)


Frame = Union[InlineFrame, SlotRefFrame, MmapRefFrame]


def _return_ref(total_len: int, map_id: int, map_generation: int, map_offset: int, payload_len: int) -> MmapRefFrame:
    return MmapRefFrame(total_len, map_id, map_generation, map_offset, payload_len, L.MR_RETURN)


_TYPES: Dict[int, Callable[..., Frame]] = {
    L.KIND_INLINE: InlineFrame,
    L.KIND_SLOT_REF: SlotRefFrame,
    L.KIND_MMAP_REF: MmapRefFrame,
    L.KIND_MMAP_RETURN: _return_ref,
}


def as_frame(raw: FrameTuple) -> Frame:
    """Turn a native frame tuple (kind, total_len, ...) into its named tuple."""
    return _TYPES[raw[0]](*raw[1:])


def decode_frame(data: Buffer) -> Frame:
    """Decode the frame at the start of `data`; LinkCorrupted if it is malformed."""
    return as_frame(_native.decode_frame(data))


def encode_frame(frame: Frame, *, legacy: bool = False) -> bytes:
    """Encode a frame; `legacy` writes inline_payload_len 0 (pre-2026-03 writers)."""
    if isinstance(frame, InlineFrame):
        return encode_inline(frame.payload, legacy)
    if isinstance(frame, SlotRefFrame):
        return encode_slot_ref(frame.class_idx, frame.extent_idx, frame.slot_idx, frame.generation)
    return encode_mmap_ref(frame.map_id, frame.map_generation, frame.map_offset, frame.payload_len, frame.flags)
