"""Golden vectors of ../shared/conformance/vox-v7 (copied under tests/conformance/vox-v7)."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub.ring import InlineFrame, MmapRefFrame, SlotRefFrame, decode_frame, encode_frame

GOLDEN = SegmentConfig(
    max_guests=2,
    bipbuf_capacity=128,
    max_payload_size=1024,
    inline_threshold=256,
    heartbeat_interval_ns=1_000_000,
    size_classes=((1024, 4), (16384, 2)),
)
SHA256 = {
    "segment_header.bin": "fb4d08e218fc5e48fa6d91d368176c118160086f381f72c11146b598eb5e6358",
    "segment_layout.bin": "75d8a8461c70ac15282db8a9ad8777760825bb4824011a2c8b9d7ffb134003dc",
    "frame_header.bin": "74ac2ae4ebcd9f54f376f0ca763e6a62e7f142f8c3a4e231c6669d425df4cdac",
    "slot_ref.bin": "203516182c2e0a7860de5ccaea35522347e3de410d3e3a5846a2afedaacc9a16",
    "frame_inline.bin": "2da5029e622cb7de2c4cec81a73d86ae8a9a142e9001885bf68a67acd5a493b8",
    "frame_slot_ref.bin": "f2c758c223dacead5f00e9a00c0748d0a71e2fd218bd48e257ff7cb3e0883e7d",
    "frame_mmap_ref.bin": "06d787640c3851cb414d828898a62e02530242345e49b69179560a270fe2614a",
}


def read(vectors, name):
    with open(os.path.join(vectors, name), "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", sorted(SHA256))
def test_vector_files_are_the_published_ones(vectors, name):
    assert hashlib.sha256(read(vectors, name)).hexdigest() == SHA256[name]


def test_created_segment_matches_golden_layout(vectors):
    gold = read(vectors, "segment_layout.bin")
    with Segment.create(GOLDEN, features=0) as seg:  # extensions off: plain upstream v7 (DECISIONS 4)
        assert seg.size == len(gold) == 38400
        # The documented peer-1 patch (VECTORS.md section 1).
        off = seg.layout.peer_entry_offset(1)
        seg.region.store_u32(off + L.PEER_STATE, L.PEER_ATTACHED)
        seg.region.store_u32(off + L.PEER_EPOCH, 7)
        seg.region.store_u64(off + L.PEER_LAST_HEARTBEAT, 12_345_678)
        mine = seg.region.read(0, seg.size)
    assert mine[:8] == L.MAGIC
    assert mine[8:] == gold[8:]


def test_layout_offsets_match_worked_example():
    lay = L.Layout.compute(2, 128, GOLDEN.size_classes)
    assert (lay.peer_table_offset, lay.ring_base, lay.var_pool_offset, lay.total_size) == (0x80, 0x100, 0x500, 38400)
    assert [lay.g2h_offset(1), lay.h2g_offset(1), lay.g2h_offset(2), lay.h2g_offset(2)] == [0x100, 0x200, 0x300, 0x400]
    assert [(c.header_offset, c.meta_offset, c.data_offset) for c in lay.classes] == [(0x500, 0x580, 0x5C0), (0x540, 0x15C0, 0x1600)]


def test_golden_segment_attaches_and_reports(vectors):
    with Segment.attach(os.path.join(vectors, "segment_layout.bin"), writable=False) as seg:
        assert seg.magic == L.MAGIC_TELEX
        assert seg.config == GOLDEN
        assert seg.peers.state(1) == L.PEER_ATTACHED and seg.peers.epoch(1) == 7
        assert seg.peers.last_heartbeat(1) == 12_345_678
        assert seg.peers.state(2) == L.PEER_EMPTY
        assert seg.pool.counts(0) == (4, 0) and seg.pool.counts(1) == (2, 0)
        assert [seg.pool.slot_meta(0, s)[3] for s in range(4)] == [1, 2, 3, L.EMPTY_INDEX]


def test_inspect_json_reports_golden_fields(vectors):
    out = subprocess.run(
        [sys.executable, "-m", "shmhub", "inspect", "--json", os.path.join(vectors, "segment_layout.bin")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    info = json.loads(out)
    h = info["header"]
    assert h["magic"] == "TELXHUB\x07" and h["version"] == 7 and h["header_size"] == 128
    assert (h["total_size"], h["current_size"], h["var_pool_offset"], h["peer_table_offset"]) == (38400, 38400, 1280, 128)
    assert (h["max_guests"], h["bipbuf_capacity"], h["max_payload_size"], h["inline_threshold"]) == (2, 128, 1024, 256)
    assert (h["heartbeat_interval_ns"], h["host_goodbye"], h["num_var_slot_classes"], h["features"]) == (1_000_000, 0, 2, 0)
    p1, p2 = info["peers"]
    assert (p1["state"], p1["epoch"], p1["last_heartbeat"], p1["ring_offset"]) == ("Attached", 7, 12_345_678, 256)
    assert (p2["state"], p2["ring_offset"]) == ("Empty", 768)
    assert p1["g2h"] == {"offset": 256, "capacity": 128, "write": 0, "watermark": 0, "read": 0, "used": 0}
    assert p1["h2g"]["offset"] == 512
    assert [(c["slot_size"], c["slot_count"], c["free"], c["allocated"]) for c in info["slot_classes"]] == [(1024, 4, 4, 0), (16384, 2, 2, 0)]


def test_segment_header_vector_is_the_layout_prefix(vectors):
    assert read(vectors, "segment_header.bin") == read(vectors, "segment_layout.bin")[:128]


def test_frame_header_and_slot_ref_vectors(vectors):
    frame = decode_frame(read(vectors, "frame_slot_ref.bin"))
    assert frame == SlotRefFrame(total_len=20, class_idx=2, extent_idx=1, slot_idx=42, generation=7)
    assert encode_frame(frame) == read(vectors, "frame_slot_ref.bin")
    assert read(vectors, "frame_slot_ref.bin") == read(vectors, "frame_header.bin") + read(vectors, "slot_ref.bin")


def test_frame_mmap_ref_vector(vectors):
    frame = decode_frame(read(vectors, "frame_mmap_ref.bin"))
    assert frame == MmapRefFrame(total_len=32, map_id=9, map_generation=3, map_offset=4096, payload_len=8192)
    assert encode_frame(frame) == read(vectors, "frame_mmap_ref.bin")


def test_frame_inline_legacy_vector(vectors):
    raw = read(vectors, "frame_inline.bin")
    frame = decode_frame(raw)
    assert frame == InlineFrame(total_len=20, payload=b"swift-shm\x00\x00\x00")
    assert encode_frame(frame, legacy=True) == raw


def test_frame_inline_modern_form():
    raw = encode_frame(InlineFrame(20, b"swift-shm"))
    assert raw[6:8] == b"\x09\x00" and len(raw) == 20
    assert decode_frame(raw) == InlineFrame(total_len=20, payload=b"swift-shm")


def test_golden_slot_ref_does_not_resolve(vectors):
    """slot_ref.bin names class 2, extent 1, slot 42: a resolver must reject it (trap 23)."""
    from shmhub.errors import InvalidSlotRef

    with Segment.create(GOLDEN) as seg:
        frame = decode_frame(read(vectors, "frame_slot_ref.bin"))
        with pytest.raises(InvalidSlotRef):
            seg.pool.take(frame.class_idx, frame.extent_idx, frame.slot_idx, frame.generation, 1)
        with pytest.raises(InvalidSlotRef):
            seg.pool.free(frame.class_idx, frame.extent_idx, frame.slot_idx, frame.generation)
