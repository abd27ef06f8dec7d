"""SegmentConfig validation and Layout.compute (format-v7 1.2, 1.7; DECISIONS 5; traps 10, 13, 16)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmhub import layout as L
from shmhub.errors import ConfigError, ShmhubError
from shmhub.layout import Layout, SegmentConfig, align, effective_inline_threshold


def A(x, a):
    """format-v7 1.2: round x up to a multiple of a."""
    return -(-x // a) * a


def spec_layout(max_guests, cap, classes):
    """The formulas of format-v7 1.2 and 1.7, written out independently of layout.py."""
    ring_base = 128 + 64 * max_guests
    stride = A(128 + cap, 64)
    rings = [(ring_base + i * 2 * stride, ring_base + i * 2 * stride + stride) for i in range(max_guests)]
    pool = A(ring_base + max_guests * 2 * stride, 64)
    off = pool + A(64 * len(classes), 64)
    cls = []
    # a growable class (slot_size, slot_count, max_extents) places its first extent like a v7 class
    for i, (size, count, *_) in enumerate(classes):
        meta = off
        data = meta + A(16 * count, 64)
        off = data + A(size * count, 64)
        cls.append((pool + 64 * i, meta, data))
    pool_size = A(64 * len(classes), 64) + sum(A(16 * n, 64) + A(s * n, 64) for s, n, *_ in classes)
    return dict(ring_base=ring_base, stride=stride, rings=rings, pool=pool, classes=cls, pool_size=pool_size, total=pool + pool_size)


# --- SegmentConfig validation ------------------------------------------------------------------

INVALID = [
    # (kwargs, a word the message must contain)
    (dict(max_guests=0), "max_guests"),
    (dict(max_guests=256), "max_guests"),
    (dict(max_guests=-1), "max_guests"),
    (dict(max_guests="2"), "max_guests"),
    (dict(max_guests=2.0), "max_guests"),
    (dict(max_guests=True), "max_guests"),
    (dict(bipbuf_capacity=0), "bipbuf_capacity"),
    (dict(bipbuf_capacity=32), "bipbuf_capacity"),
    (dict(bipbuf_capacity=100), "bipbuf_capacity"),
    (dict(bipbuf_capacity=-64), "bipbuf_capacity"),
    (dict(bipbuf_capacity=1 << 32), "bipbuf_capacity"),
    (dict(bipbuf_capacity=64.0), "bipbuf_capacity"),
    (dict(bipbuf_capacity=False), "bipbuf_capacity"),
    (dict(max_payload_size=0), "max_payload_size"),
    (dict(max_payload_size=-1), "max_payload_size"),
    (dict(max_payload_size=1 << 32), "max_payload_size"),
    (dict(max_payload_size="big"), "max_payload_size"),
    (dict(inline_threshold=-1), "inline_threshold"),
    (dict(inline_threshold=65536), "inline_threshold"),
    (dict(inline_threshold=1 << 32), "inline_threshold"),
    (dict(inline_threshold=None), "inline_threshold"),
    (dict(heartbeat_interval_ns=-1), "heartbeat_interval_ns"),
    (dict(heartbeat_interval_ns=1 << 64), "heartbeat_interval_ns"),
    (dict(heartbeat_interval_ns=1.5), "heartbeat_interval_ns"),
    (dict(heartbeat_interval_ns=True), "heartbeat_interval_ns"),
    (dict(size_classes=()), "size_classes"),
    (dict(size_classes=tuple((64 * (i + 1), 1) for i in range(257))), "size_classes"),
    (dict(size_classes=((64,),)), "size_classes[0]"),
    (dict(size_classes=((64, 1, 1, 1),)), "size_classes[0]"),  # (slot_size, slot_count[, max_extents])
    (dict(size_classes=((64, 1, 0),)), "size_classes[0]"),
    (dict(size_classes=((64, 1), (128, 1, L.MAX_EXTENTS + 1))), "size_classes[1]"),
    (dict(size_classes=((64, 1, -1),)), "size_classes[0]"),
    (dict(size_classes=((64, 1, 2.0),)), "size_classes[0]"),
    (dict(size_classes=((64, 1, "2"),)), "size_classes[0]"),
    (dict(size_classes=((64, 1, True),)), "size_classes[0]"),
    (dict(size_classes=((64, 1), (0, 1))), "size_classes[1]"),
    (dict(size_classes=((100, 1),)), "size_classes[0]"),
    (dict(size_classes=((32, 1),)), "size_classes[0]"),
    (dict(size_classes=((-64, 1),)), "size_classes[0]"),
    (dict(size_classes=((1 << 32, 1),)), "size_classes[0]"),
    (dict(size_classes=((64, 0),)), "size_classes[0]"),
    (dict(size_classes=((64, -1),)), "size_classes[0]"),
    (dict(size_classes=((64, L.EMPTY_INDEX),)), "size_classes[0]"),
    # global free-list indices (extent * slot_count + slot) of every possible extent stay below EMPTY
    (dict(size_classes=((64, (L.EMPTY_INDEX - 1) // L.MAX_EXTENTS + 1),)), "size_classes[0]"),
    (dict(size_classes=((64, "4"),)), "size_classes[0]"),
    (dict(size_classes=((64.0, 4),)), "size_classes[0]"),
    (dict(size_classes=((128, 1), (64, 1))), "ascending"),
    (dict(size_classes=((128, 1), (128, 1))), "ascending"),
    # forgetting the nesting is the likeliest mistake; it must still be a ConfigError
    (dict(size_classes=(1024, 4)), "size_classes"),
    (dict(size_classes=None), "size_classes"),
]


@pytest.mark.parametrize("kwargs, word", INVALID, ids=[f"{k}={str(v)[:30]}" for kw, _ in INVALID for k, v in kw.items()])
def test_invalid_config_raises_config_error_naming_field(kwargs, word):
    with pytest.raises(ConfigError) as ei:
        SegmentConfig(**kwargs)
    assert word in str(ei.value), str(ei.value)
    assert isinstance(ei.value, ShmhubError) and isinstance(ei.value, ValueError)


def test_too_big_segment_is_config_error():
    # trap 13: checked arithmetic; a segment beyond what can be mapped is refused up front.
    # Every class is valid on its own (the most slots a class may have); together they are not.
    n = (L.EMPTY_INDEX - 1) // L.MAX_EXTENTS
    with pytest.raises(ConfigError) as ei:
        SegmentConfig(max_guests=1, bipbuf_capacity=64, size_classes=((0xFFFFFF40, n), (0xFFFFFF80, n), (0xFFFFFFC0, n)))
    assert "segment size" in str(ei.value)
    with pytest.raises(ConfigError):
        Layout.compute(1, 64, ((0xFFFFFFC0, 0xFFFFFFFE), (0xFFFFFFFF, 0xFFFFFFFE)))


def test_bipbuf_capacity_message_suggests_fix():
    with pytest.raises(ConfigError) as ei:
        SegmentConfig(bipbuf_capacity=100)
    assert "128" in str(ei.value)  # the next multiple of 64


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(max_guests=1),
        dict(max_guests=255),
        dict(bipbuf_capacity=64),
        dict(bipbuf_capacity=0xFFFFFFC0, max_guests=1, size_classes=((64, 1),)),
        dict(max_payload_size=1),
        dict(max_payload_size=L.U32_MAX),
        dict(inline_threshold=0),
        dict(inline_threshold=65535),
        dict(heartbeat_interval_ns=0),
        dict(heartbeat_interval_ns=L.U64_MAX),
        dict(size_classes=[[64, 1]]),
        dict(size_classes=tuple((64 * (i + 1), 1) for i in range(256))),
        dict(size_classes=((64, (L.EMPTY_INDEX - 1) // L.MAX_EXTENTS),)),  # the most slots a class may have
        dict(size_classes=((64, 1, 1),)),  # max_extents 1: a class that cannot grow
        dict(size_classes=((64, 4), (128, 2, L.MAX_EXTENTS))),
        dict(size_classes=[[64, 1, 2]]),
    ],
)
def test_valid_configs(kwargs):
    cfg = SegmentConfig(**kwargs)
    for k, v in kwargs.items():
        if k == "size_classes":
            assert cfg.size_classes == tuple(tuple(c) for c in v)
            assert all(isinstance(c, tuple) for c in cfg.size_classes)  # normalised, hashable
        else:
            assert getattr(cfg, k) == v
    hash(cfg)


def test_config_is_frozen():
    cfg = SegmentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_guests = 3  # type: ignore[misc]


def test_default_config():
    cfg = SegmentConfig()
    assert (cfg.max_guests, cfg.bipbuf_capacity, cfg.inline_threshold, cfg.heartbeat_interval_ns) == (8, 256 * 1024, 256, 0)
    assert cfg.max_slot_payload == (1 << 20) - 4


# --- effective inline threshold (DECISIONS 5, trap 10) -----------------------------------------


@pytest.mark.parametrize(
    "header, cap, expected",
    [
        (0, 1 << 20, 256),  # 0 means the default 256
        (256, 1 << 20, 256),
        (100, 1 << 20, 100),
        (1, 1 << 20, 1),
        (65535, 1 << 20, 65535),
        (70000, 1 << 20, 65535),  # inline_payload_len is a u16
        (0, 64, 24),  # 64 // 2 - 8: no entry may exceed half the ring
        (256, 128, 56),
        (56, 128, 56),
        (10, 64, 10),
        (0, 512, 248),
        (0, 576, 256),
    ],
)
def test_effective_inline_threshold(header, cap, expected):
    assert effective_inline_threshold(header, cap) == expected
    # trap 10: an inline entry at the threshold (header + payload + padding) fits in half the ring
    assert align(8 + expected, 4) <= cap // 2


def test_effective_inline_threshold_on_config():
    cfg = SegmentConfig(bipbuf_capacity=64, inline_threshold=0, size_classes=((64, 1),))
    assert cfg.effective_inline_threshold == 24
    assert SegmentConfig(inline_threshold=300).effective_inline_threshold == 300


def test_max_slot_payload():
    assert SegmentConfig(size_classes=((64, 1), (4096, 2))).max_slot_payload == 4092  # format-v7 1.6


# --- Layout.compute against format-v7 1.2 / 1.7 -------------------------------------------------

CONFIGS = [
    (2, 128, ((1024, 4), (16384, 2))),  # the golden vector config
    (1, 64, ((64, 1),)),
    (3, 192, ((192, 5), (320, 3), (4096, 1))),
    (8, 256 * 1024, ((1024, 256), (16 * 1024, 128), (256 * 1024, 16), (1 << 20, 8))),
    (255, 64, ((64, 3), (128, 5))),
    (5, 640, ((64, 1), (128, 2), (192, 3), (256, 4), (320, 5))),
    (2, 128, ((64, 4, 3), (256, 2), (1024, 1, 5))),  # growable classes: extent 0 as in v7
]


@pytest.mark.parametrize("g, cap, classes", CONFIGS)
def test_layout_matches_spec_formulas(g, cap, classes):
    lay = Layout.compute(g, cap, classes)
    ref = spec_layout(g, cap, classes)
    assert lay.peer_table_offset == 128
    assert lay.ring_base == ref["ring_base"]
    assert lay.ring_stride == ref["stride"]
    assert [(lay.g2h_offset(p), lay.h2g_offset(p)) for p in range(1, g + 1)] == ref["rings"]
    assert [lay.ring_offset(p) for p in range(1, g + 1)] == [r[0] for r in ref["rings"]]
    assert [lay.peer_entry_offset(p) for p in range(1, g + 1)] == [128 + 64 * i for i in range(g)]
    assert lay.var_pool_offset == ref["pool"]
    assert [(c.header_offset, c.meta_offset, c.data_offset) for c in lay.classes] == ref["classes"]
    assert [(c.slot_size, c.slot_count) for c in lay.classes] == [tuple(c[:2]) for c in classes]
    assert [c.max_extents for c in lay.classes] == [c[2] if len(c) > 2 else 1 for c in classes]
    assert lay.pool_size == ref["pool_size"]
    assert lay.total_size == ref["total"] == lay.var_pool_offset + lay.pool_size
    assert (lay.max_guests, lay.bipbuf_capacity) == (g, cap)


def test_worked_example():
    lay = Layout.compute(2, 128, ((1024, 4), (16384, 2)))
    assert (lay.ring_base, lay.ring_stride, lay.var_pool_offset, lay.total_size) == (0x100, 0x100, 0x500, 38400)


def test_pool_size_includes_meta_arrays():
    # trap 13: upstream forgot the slot-meta array, so the next region overlapped
    lay = Layout.compute(1, 64, ((64, 100),))
    data_only = 64 + 64 * 100
    assert lay.pool_size == 64 + A(16 * 100, 64) + 64 * 100
    assert lay.pool_size - data_only == 1600
    c = lay.classes[0]
    assert c.data_offset - c.meta_offset == 1600
    assert c.data_offset + 64 * 100 == lay.total_size


def test_non_multiple_of_64_sizes_are_padded():
    # Layout.compute is also used on classes read from a segment, which need not be multiples of 64
    lay = Layout.compute(1, 64, ((100, 3), (200, 1)))
    c0, c1 = lay.classes
    assert c0.data_offset - c0.meta_offset == 64  # 48 bytes of meta, padded
    assert c1.meta_offset - c0.data_offset == 320  # 300 bytes of data, padded
    assert c1.meta_offset % 64 == 0 and lay.total_size % 64 == 0


def test_extent_layout():
    # FEATURE_EXTENTS: an appended extent is the slot metadata, padded to 64, then the slot data
    assert L.extent_layout(256, 3) == (64, 64 + 768)
    assert L.extent_layout(100, 5) == (128, 128 + 512)  # 80 bytes of meta, 500 of data, padded
    assert L.extent_layout(64, 100) == (1600, 1600 + 6400)
    data, size = L.extent_layout(1024, 4)
    lay = Layout.compute(1, 64, ((1024, 4),))
    c = lay.classes[0]
    assert (data, size) == (c.data_offset - c.meta_offset, lay.total_size - c.meta_offset)  # same as extent 0


def test_growth_does_not_change_the_v7_layout():
    # max_extents lives in the class header's padding: the v7 offsets are those of the same
    # classes without it, so an upstream reader finds everything where it expects
    grow = Layout.compute(3, 192, ((64, 4, 5), (256, 2, 2)))
    plain = Layout.compute(3, 192, ((64, 4), (256, 2)))
    assert [c.max_extents for c in grow.classes] == [5, 2]
    assert [c.max_extents for c in plain.classes] == [1, 1]
    strip = lambda lay: (lay.total_size, lay.var_pool_offset, [(c.header_offset, c.meta_offset, c.data_offset) for c in lay.classes])  # noqa: E731
    assert strip(grow) == strip(plain)


@pytest.mark.parametrize("peer_id", [0, -1, 3, 256])
def test_layout_peer_bounds(peer_id):
    # trap 16
    lay = Layout.compute(2, 64, ((64, 1),))
    for f in (lay.peer_entry_offset, lay.ring_offset, lay.g2h_offset, lay.h2g_offset):
        with pytest.raises(ValueError):
            f(peer_id)


def _regions(lay, classes):
    out = [("header", 0, 128)]
    out += [(f"peer{p}", lay.peer_entry_offset(p), 64) for p in range(1, lay.max_guests + 1)]
    for p in range(1, lay.max_guests + 1):
        out.append((f"g2h{p}", lay.g2h_offset(p), 128 + lay.bipbuf_capacity))
        out.append((f"h2g{p}", lay.h2g_offset(p), 128 + lay.bipbuf_capacity))
    for i, c in enumerate(lay.classes):
        out.append((f"class{i}.header", c.header_offset, 64))
        out.append((f"class{i}.meta", c.meta_offset, 16 * c.slot_count))
        out.append((f"class{i}.data", c.data_offset, c.slot_size * c.slot_count))
    return out


classes_st = st.lists(st.tuples(st.integers(1, 4096), st.integers(1, 300)), min_size=1, max_size=12).map(
    lambda cs: tuple((s * 64, n) for s, n in sorted({s: n for s, n in cs}.items()))
)


@settings(max_examples=300, derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=st.integers(1, 255), cap=st.integers(1, 1 << 16).map(lambda x: x * 64), classes=classes_st)
def test_regions_never_overlap(g, cap, classes):
    # trap 13: every region lies inside total_size and no two overlap; every base is 64-aligned
    cfg = SegmentConfig(max_guests=g, bipbuf_capacity=cap, size_classes=classes)
    lay = Layout.compute(cfg.max_guests, cfg.bipbuf_capacity, cfg.size_classes)
    regions = sorted(_regions(lay, classes), key=lambda r: r[1])
    for (n1, o1, s1), (n2, o2, _) in zip(regions, regions[1:]):
        assert o1 + s1 <= o2, f"{n1} [{o1}, {o1 + s1}) overlaps {n2} at {o2}"
    last = regions[-1]
    assert last[1] + last[2] <= lay.total_size
    for name, off, _ in regions:
        if not name.startswith("peer"):
            assert off % 64 == 0, name
    assert lay.var_pool_offset % 64 == 0 and lay.total_size % 64 == 0
    assert lay == Layout.compute(g, cap, classes)  # a pure function: both sides agree
    ref = spec_layout(g, cap, classes)
    assert (lay.var_pool_offset, lay.pool_size, lay.total_size) == (ref["pool"], ref["pool_size"], ref["total"])


def test_align():
    assert [align(x, 64) for x in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]
    assert align(5, 4) == 8 and align(8, 4) == 8
