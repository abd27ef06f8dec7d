"""The roam v7 binary layout: every constant, offset and size, and SegmentConfig -> Layout.

This module is the single source of truth for the format (format-v7.md). setup.py turns every
upper-case integer constant below into a SHMHUB_<NAME> macro in _layout.h for the compiled core,
so the C code and the Python code can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Tuple

from .errors import ConfigError

# --- Segment header (128 bytes at offset 0), format-v7 1.1 -----------------------------------
MAGIC = b"ROAMHUB\x07"  # DECISIONS 1: what we write
MAGIC_TELEX = b"TELXHUB\x07"  # upstream's later name for the same layout; accepted on attach
ACCEPTED_MAGICS = (MAGIC, MAGIC_TELEX)
VERSION = 7
HEADER_SIZE = 128

HDR_MAGIC = 0
HDR_VERSION = 8
HDR_HEADER_SIZE = 12
HDR_TOTAL_SIZE = 16
HDR_MAX_PAYLOAD_SIZE = 24
HDR_INLINE_THRESHOLD = 28
HDR_MAX_GUESTS = 32
HDR_BIPBUF_CAPACITY = 36
HDR_PEER_TABLE_OFFSET = 40
HDR_VAR_POOL_OFFSET = 48
HDR_HEARTBEAT_INTERVAL = 56
HDR_HOST_GOODBYE = 64  # AtomicU32
HDR_NUM_CLASSES = 68  # spec's `_pad`; upstream code stores the class count (DECISIONS 2)
HDR_CURRENT_SIZE = 72  # AtomicU64
HDR_FEATURES = 80  # first reserved u32: extension bitmask (DECISIONS 4)
# FEATURE_POOL_WAITERS, in the header's reserved bytes:
HDR_ATTENTION = 84  # AtomicU32 futex word: a guest bumps it and wakes the host's monitor (growth, goodbye)
HDR_SHARE_LINKS = 88  # u32, written by the host: link directions sharing the pool (0 = no slot shares)
HDR_RESERVED_END = 128

# Feature bits (DECISIONS 4). Each is listed in docs/format.md section 3 and its fields in that
# file's offset tables (checked by tests/unit/test_docs.py); docs/extensions.md describes its protocol.
FEATURE_WAITER_FLAGS = 1 << 0  # RING_CONSUMER_WAITING / RING_PRODUCER_WAITING: doorbell elision
FEATURE_MMAP_LEASES = 1 << 1  # mmap-tier mappings start with a MAP_HEADER carrying a lease count
FEATURE_EXTENTS = 1 << 2  # growable slot classes: CLS_EXTENT_* fields, extents appended to the file
FEATURE_POOL_JOURNAL = 1 << 3  # guests journal the slot pop/free they are in: PEER_POOL_OP*
FEATURE_POOL_WAITERS = 1 << 4  # futex waits for free slots (CLS_WAITERS), the host's attention word, slot shares
FEATURE_RING_COUNTERS = 1 << 5  # RING_SENT_MESSAGES / RING_SENT_BYTES: producers count what they send
FEATURE_MMAP_RETURN = 1 << 6  # MR_RETURN: a received mmap payload goes back to its sender by reference
KNOWN_FEATURES = (
    FEATURE_WAITER_FLAGS | FEATURE_MMAP_LEASES | FEATURE_EXTENTS | FEATURE_POOL_JOURNAL | FEATURE_POOL_WAITERS | FEATURE_RING_COUNTERS | FEATURE_MMAP_RETURN
)

DEFAULT_INLINE_THRESHOLD = 256  # header value 0 means this
MAX_INLINE_LEN = 0xFFFF  # inline_payload_len is a u16

# --- Peer table (64 bytes per entry, index = peer_id - 1), format-v7 1.3 -----------------------
PEER_TABLE_OFFSET = 128
PEER_ENTRY_SIZE = 64
PEER_STATE = 0  # AtomicU32
PEER_EPOCH = 4  # AtomicU32
PEER_LAST_HEARTBEAT = 8  # AtomicU64
PEER_RING_OFFSET = 16  # u64, written once by the host
# FEATURE_MMAP_LEASES, in the entry's reserved bytes: the mmap tier of this peer's link, per
# direction, for inspection. The sender of a direction stores its mapping count and size; leases
# are +1 per payload sent and -1 when the receiver releases it.
PEER_G2H_MAPPINGS = 24  # u32, written by the guest
PEER_H2G_MAPPINGS = 28  # u32, written by the host
PEER_G2H_LEASES = 32  # AtomicU32
PEER_H2G_LEASES = 36  # AtomicU32
PEER_G2H_MAPPED_KIB = 40  # u32, written by the guest: KiB mapped
PEER_H2G_MAPPED_KIB = 44  # u32, written by the host: KiB mapped
# FEATURE_POOL_JOURNAL: while a guest pops or frees a slot it records it here, so the host's
# recovery can finish the operation if the guest dies between its two halves (docs/deviations.md).
PEER_POOL_OP = 48  # AtomicU64: op << 56 | class_idx << 32 | global slot index (0 = none)
PEER_POOL_OP_GEN = 56  # u32: the slot's generation when the operation began
PEER_EXT_END = 64
POOL_OP_NONE = 0
POOL_OP_POP = 1
POOL_OP_FREE = 2

PEER_EMPTY = 0
PEER_ATTACHED = 1
PEER_GOODBYE = 2
PEER_RESERVED = 3

MAX_GUESTS_LIMIT = 255

# --- BipBuffer header (128 bytes, 64-aligned) + capacity data bytes, format-v7 1.4 -------------
RING_HEADER_SIZE = 128
RING_WRITE = 0  # AtomicU32, producer
RING_WATERMARK = 4  # AtomicU32, producer sets, consumer clears
RING_CAPACITY = 8  # u32, immutable
RING_READ = 64  # AtomicU32, consumer
# FEATURE_WAITER_FLAGS: a side about to sleep stores 1 here (in v7 padding, each on its own
# cache line) and the other side rings the doorbell only when it reads 1.
RING_PRODUCER_WAITING = 12  # AtomicU32 in the producer's pad: producer sleeps for space or a slot
RING_CONSUMER_WAITING = 68  # AtomicU32 in the consumer's pad: consumer sleeps for data
# FEATURE_RING_COUNTERS: running totals in the producer's pad, written by the producer alone (relaxed
# load + store under its send lock), read by anyone (shmhub top): rates without touching the hot path.
RING_SENT_MESSAGES = 16  # u64: messages committed to the ring since it was created or reset
RING_SENT_BYTES = 24  # u64: their payload bytes, whatever the tier
RING_DOORBELLS = 32  # u64, atomic add (any thread of the producer's process may ring): doorbells it rang its peer
RING_ALIGN = 64

# --- Frames (8-byte header; entries 4-aligned), format-v7 1.5 ----------------------------------
FRAME_HEADER_SIZE = 8
FRAME_TOTAL_LEN = 0
FRAME_FLAGS = 4
FRAME_RESERVED0 = 5
FRAME_INLINE_LEN = 6  # u16; 0 = legacy writer, payload is total_len - 8 bytes
FRAME_ALIGN = 4
FLAG_SLOT_REF = 0x01
FLAG_MMAP_REF = 0x02

SLOT_REF_FRAME_SIZE = 20
SLOT_REF_BODY_SIZE = 12
SR_CLASS = 0  # u8
SR_EXTENT = 1  # u8
SR_SLOT = 4  # u32
SR_GENERATION = 8  # u32

MMAP_REF_FRAME_SIZE = 32
MMAP_REF_BODY_SIZE = 24
MR_MAP_ID = 0  # u32
MR_MAP_GENERATION = 4  # u32
MR_MAP_OFFSET = 8  # u64, only 4-aligned inside a ring
MR_PAYLOAD_LEN = 16  # u32
MR_FLAGS = 20  # u32, reserved (0) in v7; FEATURE_MMAP_RETURN gives it bit 0
MR_RETURN = 0x1  # the mapping is the reader's own, lent back by its peer (docs/extensions.md, bit 6)

# Kinds returned by the frame reader.
KIND_INLINE = 0
KIND_SLOT_REF = 1
KIND_MMAP_REF = 2
KIND_MMAP_RETURN = 3  # an mmap-ref frame with MR_RETURN

# --- mmap tier (format-v7 1.10, DECISIONS 11) ------------------------------------------------
MMAP_ATTACH_SIZE = 16  # control datagram body: u32 map_id, u32 map_generation, u64 mapping_length
MA_MAP_ID = 0
MA_MAP_GENERATION = 4
MA_MAPPING_LENGTH = 8
# FEATURE_MMAP_LEASES: every mapping begins with this header; payloads start at MAP_HEADER_SIZE
# (page-aligned, so arrays in a mapping are aligned too).
MAP_MAGIC = b"SHMHMAP1"
MAP_HDR_MAGIC = 0
MAP_HDR_MAP_ID = 8  # u32
MAP_HDR_GENERATION = 12  # u32
MAP_HDR_LEASES = 16  # AtomicU32: +1 by the sender per payload sent, -1 by the receiver on release
MAP_HDR_RETIRED = 20  # AtomicU32: 1 = the sender will never reference this mapping again
MAP_HEADER_SIZE = 4096

# --- Bootstrap wire over a Unix stream socket (format-v7 1.11, DECISIONS 17) -----------------
BOOTSTRAP_REQUEST = b"VSH1"  # the whole request: exactly these 4 bytes
BOOTSTRAP_REQUEST_SIZE = 4
BOOTSTRAP_REQUEST_OLD = b"RSH0"  # the older revision's request magic (+ u16 sid_len + sid): refused by name
BOOTSTRAP_RESPONSE_MAGIC = b"VSP1"
BOOTSTRAP_RESPONSE_HEADER_SIZE = 11  # then payload_len bytes; the frame is exactly 11 + payload_len
BR_MAGIC = 0  # 4 bytes
BR_STATUS = 4  # u8
BR_PEER_ID = 5  # u32 LE (unaligned); 0 on error
BR_PAYLOAD_LEN = 9  # u16 LE
BR_PAYLOAD = 11  # UTF-8: segment path ("" for an anonymous segment) on success, diagnostic on error
BOOTSTRAP_STATUS_OK = 0
BOOTSTRAP_STATUS_ERROR = 1
BOOTSTRAP_MAX_PAYLOAD = 0xFFFF
# Success only: exactly 4 fds in one SCM_RIGHTS cmsg, in this order (none on error).
BOOTSTRAP_NUM_FDS = 4
BOOTSTRAP_FD_DOORBELL = 0
BOOTSTRAP_FD_SEGMENT = 1
BOOTSTRAP_FD_MMAP_RX = 2
BOOTSTRAP_FD_MMAP_TX = 3

# --- VarSlotPool, format-v7 1.6-1.7 -----------------------------------------------------------
CLASS_HEADER_SIZE = 64
CLS_SLOT_SIZE = 0  # u32
CLS_SLOT_COUNT = 4  # u32
CLS_FREE_HEAD = 8  # AtomicU64 = (aba_tag << 32) | slot_index
# FEATURE_EXTENTS, in the class header's v7 padding (0 in both count fields means 1: no growth).
# One free list spans all extents: its indices are global, extent_idx * slot_count + slot_idx.
CLS_EXTENT_COUNT = 16  # AtomicU32: extents published (extent 0 is the v7 pool itself)
CLS_MAX_EXTENTS = 20  # u32: how many this class may have
CLS_EXTENT_OFFSETS = 24  # u64 x (MAX_EXTENTS - 1): file offsets of extents 1.., page-aligned
CLS_GROW_REQUEST = 56  # AtomicU32: a guest found the class exhausted and asks the host to grow it
# FEATURE_POOL_WAITERS: a futex word. Bit 0 is set by a thread about to sleep waiting for a slot of
# this class; bits 1..31 are a wake sequence a freer advances (clearing bit 0) before FUTEX_WAKE.
CLS_WAITERS = 60  # AtomicU32
POOL_WAITERS_MASK = 0x1
POOL_WAKE_STEP = 0x2
SLOT_SHARE_MIN = 2  # a link direction may always hold this many slots of a class
MAX_EXTENTS = 5
EXTENT_ALIGN = 4096  # extents are mapped on their own, at page-aligned offsets

SLOT_META_SIZE = 16
META_GENERATION = 0  # AtomicU32 (with META_STATE, one u64 word for the CAS of DECISIONS 8)
META_STATE = 4  # u32
META_OWNER = 8  # u32: 0 = host, 1..255 guest
META_NEXT_FREE = 12  # u32

SLOT_FREE = 0
SLOT_ALLOCATED = 1
EMPTY_INDEX = 0xFFFFFFFF
SLOT_LEN_PREFIX = 4  # a slot holds [u32 payload_len][payload]
HOST_OWNER = 0
MAX_CLASSES = 256  # class_idx is a u8

ALIGN = 64
U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF


def align(x: int, a: int) -> int:
    """Round x up to a multiple of a."""
    return (x + a - 1) // a * a


def _u32(name: str, value: int, fix: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= U32_MAX:
        raise ConfigError(f"{name}={value} does not fit in a u32; {fix}")
    return value


@dataclass(frozen=True)
class SegmentConfig:
    """The parameters a host chooses for a segment. Guests read them back from the segment."""

    max_guests: int = 8
    bipbuf_capacity: int = 256 * 1024
    max_payload_size: int = 1 << 30
    inline_threshold: int = DEFAULT_INLINE_THRESHOLD
    heartbeat_interval_ns: int = 0
    # (slot_size, slot_count) or (slot_size, slot_count, max_extents): a class with max_extents > 1
    # grows by appending extents of slot_count slots when it runs out (FEATURE_EXTENTS).
    size_classes: Tuple[Tuple[int, ...], ...] = ((1024, 256), (16 * 1024, 128), (256 * 1024, 16), (1 << 20, 8))

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "size_classes", tuple(tuple(c) for c in self.size_classes))
        except TypeError:
            raise ConfigError(
                f"size_classes={self.size_classes!r} must be a sequence of (slot_size, slot_count) pairs, for example ((1024, 256), (16384, 128))"
            ) from None
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_guests, int) or isinstance(self.max_guests, bool) or not 1 <= self.max_guests <= MAX_GUESTS_LIMIT:
            raise ConfigError(f"max_guests={self.max_guests!r} must be between 1 and {MAX_GUESTS_LIMIT}")
        cap = _u32("bipbuf_capacity", self.bipbuf_capacity, "use at most 4 GiB - 64")
        if cap < RING_ALIGN or cap % RING_ALIGN:
            raise ConfigError(
                f"bipbuf_capacity={cap} must be a multiple of {RING_ALIGN} and at least {RING_ALIGN} "
                f"(DECISIONS 5); try {max(RING_ALIGN, align(cap, RING_ALIGN))}"
            )
        mp = _u32("max_payload_size", self.max_payload_size, "use at most 4 GiB - 1")
        if mp < 1:
            raise ConfigError("max_payload_size must be at least 1")
        it = _u32("inline_threshold", self.inline_threshold, f"use at most {MAX_INLINE_LEN}")
        if it > MAX_INLINE_LEN:
            raise ConfigError(f"inline_threshold={it} exceeds {MAX_INLINE_LEN} (inline_payload_len is a u16)")
        hb = self.heartbeat_interval_ns
        if not isinstance(hb, int) or isinstance(hb, bool) or not 0 <= hb <= U64_MAX:
            raise ConfigError(f"heartbeat_interval_ns={hb!r} must be a non-negative u64 (0 disables heartbeats)")
        classes = self.size_classes
        if not 1 <= len(classes) <= MAX_CLASSES:
            raise ConfigError(f"size_classes must hold 1 to {MAX_CLASSES} (slot_size, slot_count) pairs, got {len(classes)}")
        prev = 0
        for i, c in enumerate(classes):
            if len(c) not in (2, 3):
                raise ConfigError(f"size_classes[{i}]={c!r} must be (slot_size, slot_count) or (slot_size, slot_count, max_extents)")
            size, count = c[0], c[1]
            extents = c[2] if len(c) == 3 else 1
            if not isinstance(extents, int) or isinstance(extents, bool) or not 1 <= extents <= MAX_EXTENTS:
                raise ConfigError(f"size_classes[{i}] max_extents={extents!r} must be between 1 and {MAX_EXTENTS}")
            _u32(f"size_classes[{i}] slot_size", size, "use smaller slots (large payloads go through the mmap tier)")
            _u32(f"size_classes[{i}] slot_count", count, "use fewer slots")
            if size < ALIGN or size % ALIGN:
                raise ConfigError(f"size_classes[{i}] slot_size={size} must be a positive multiple of {ALIGN}")
            if not 1 <= count or count * MAX_EXTENTS >= EMPTY_INDEX:
                raise ConfigError(f"size_classes[{i}] slot_count={count} must be between 1 and {(EMPTY_INDEX - 1) // MAX_EXTENTS}")
            if size <= prev:
                raise ConfigError(f"size_classes must be in strictly ascending slot_size order; class {i} has {size} after {prev}")
            prev = size
        Layout.compute(self.max_guests, cap, classes)

    @property
    def effective_inline_threshold(self) -> int:
        return effective_inline_threshold(self.inline_threshold, self.bipbuf_capacity)

    @property
    def max_slot_payload(self) -> int:
        """The largest payload that fits in a slot (the largest slot minus its u32 length prefix)."""
        return max(c[0] for c in self.size_classes) - SLOT_LEN_PREFIX


def effective_inline_threshold(header_value: int, capacity: int) -> int:
    """Inline routing limit: header 0 means 256; clamped so no entry exceeds half the ring (DECISIONS 5, trap 10)."""
    t = header_value or DEFAULT_INLINE_THRESHOLD
    return max(0, min(t, MAX_INLINE_LEN, capacity // 2 - FRAME_HEADER_SIZE))


def extent_layout(slot_size: int, slot_count: int) -> Tuple[int, int]:
    """(data offset, size) of one appended extent: slot metadata at 0, then the slot data."""
    data = align(SLOT_META_SIZE * slot_count, ALIGN)
    return data, data + align(slot_size * slot_count, ALIGN)


@dataclass(frozen=True)
class ClassLayout:
    slot_size: int
    slot_count: int
    header_offset: int  # absolute offsets in the segment
    meta_offset: int
    data_offset: int
    max_extents: int = 1  # FEATURE_EXTENTS: > 1 for a growable class


@dataclass(frozen=True)
class Layout:
    """Offsets of every region of a segment, computed from the config (format-v7 1.2 and 1.7)."""

    max_guests: int
    bipbuf_capacity: int
    ring_base: int
    ring_stride: int
    var_pool_offset: int
    pool_size: int
    total_size: int
    classes: Tuple[ClassLayout, ...] = field(default_factory=tuple)
    peer_table_offset: int = PEER_TABLE_OFFSET

    @classmethod
    def compute(cls, max_guests: int, bipbuf_capacity: int, size_classes: Sequence[Tuple[int, ...]]) -> "Layout":
        # Python ints do not overflow; "checked arithmetic" (trap 13) means every result is
        # range-checked against what the format can store.
        ring_base = PEER_TABLE_OFFSET + PEER_ENTRY_SIZE * max_guests
        ring_stride = align(RING_HEADER_SIZE + bipbuf_capacity, RING_ALIGN)
        pool = align(ring_base + max_guests * 2 * ring_stride, ALIGN)
        off = pool + align(CLASS_HEADER_SIZE * len(size_classes), ALIGN)
        classes = []
        for i, c in enumerate(size_classes):
            size, count = c[0], c[1]
            meta = off
            data = meta + align(SLOT_META_SIZE * count, ALIGN)
            off = data + align(size * count, ALIGN)
            classes.append(ClassLayout(size, count, pool + i * CLASS_HEADER_SIZE, meta, data, c[2] if len(c) > 2 else 1))
        if off > U64_MAX >> 1:
            raise ConfigError(f"segment size {off} is beyond what can be mapped; use fewer or smaller slots")
        return cls(max_guests, bipbuf_capacity, ring_base, ring_stride, pool, off - pool, off, tuple(classes))

    def peer_entry_offset(self, peer_id: int) -> int:
        self._check_peer(peer_id)
        return self.peer_table_offset + (peer_id - 1) * PEER_ENTRY_SIZE

    def ring_offset(self, peer_id: int) -> int:
        """Offset of the peer's G2H ring header; its H2G ring follows at + ring_stride."""
        self._check_peer(peer_id)
        return self.ring_base + (peer_id - 1) * 2 * self.ring_stride

    def g2h_offset(self, peer_id: int) -> int:
        return self.ring_offset(peer_id)

    def h2g_offset(self, peer_id: int) -> int:
        return self.ring_offset(peer_id) + self.ring_stride

    def _check_peer(self, peer_id: int) -> None:
        if not 1 <= peer_id <= self.max_guests:  # trap 16
            raise ValueError(f"peer_id {peer_id} out of range 1..{self.max_guests}")
