"""`python -m shmhub inspect PATH [--json]` (docs/inspect.md) on a segment with traffic in flight:
the JSON and the text report must match the state, the documented schema must match the JSON,
and broken inputs must give exit status 1 with a one-line error."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys

import pytest

from shmhub import Segment, SegmentConfig, bigmap
from shmhub import layout as L
from shmhub.cli import INSPECT_SCHEMA, main
from shmhub.doorbell import Doorbell
from shmhub.link import GUEST, HOST, Link

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "inspect.md")
CFG = SegmentConfig(
    max_guests=4, bipbuf_capacity=256, max_payload_size=1 << 20, inline_threshold=100, heartbeat_interval_ns=5_000_000, size_classes=((64, 4), (256, 2))
)
TYPES = {"int": int, "string": str, "object": dict, "array of object": (list, dict), "array of int": (list, int)}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "shmhub", "inspect", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def documented_objects() -> dict:
    """{object name: {key: (type, feature)}} from the <!-- inspect-object: NAME [when=FEATURE_X] -->
    tables of docs/inspect.md; feature is None for a key that is always present, else the name of
    the layout.py feature bit whose presence in `features` makes the key present."""
    with open(DOC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, current, when = {}, None, None
    for line in lines:
        m = re.match(r"<!--\s*inspect-object:\s*(\w+)(?:\s+when=(\w+))?\s*-->", line)
        if m:
            current, when = out.setdefault(m.group(1), {}), m.group(2)
            assert when is None or when.startswith("FEATURE_") and hasattr(L, when), when
            continue
        if current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            key = cells[0].strip("`")
            assert key not in current, f"{key} documented twice"
            current[key] = (cells[1], when)
        elif current is not None and line.strip() and not line.startswith("|"):
            current = None
    return out


def make_traffic(seg: Segment) -> dict:
    """Peers in every state, frames in flight (one ring wrapped), slots allocated. Returns the
    expected facts, computed from what was done (not from the segment)."""
    peers = seg.peers
    p1 = peers.attach()  # walk-in guest: Attached, epoch 1, heartbeat written
    p2 = peers.reserve()  # Reserved, epoch 1
    p3 = peers.reserve()
    peers.claim(p3)
    peers.detach(p3)  # Goodbye, epoch 1
    assert (p1, p2, p3) == (1, 2, 3)  # peer 4 stays Empty

    # g2h(1): three inline frames (20 + 28 + 40 bytes), the first one consumed: 68 in flight.
    g2h = seg.g2h(1)
    for n in (10, 20, 30):
        assert g2h.write_inline(b"x" * n)
    frame = g2h.read_frame()
    g2h.release(frame[1])

    # h2g(2): 3 x 64-byte frames, two consumed, then a 100-byte frame that must wrap:
    # watermark 192, read 128, write 100 -> 64 + 100 bytes in flight.
    h2g = seg.h2g(2)
    for _ in range(3):
        assert h2g.write_inline(b"y" * 56)
    for _ in range(2):
        h2g.release(h2g.read_frame()[1])
    assert h2g.write_inline(b"z" * 92)

    # Slots: class 0 three allocated (owners 1, 1, host), one of them freed again; class 1 one
    # allocated and sent by reference on h2g(1) (a 20-byte slot-ref frame in flight).
    pool = seg.pool
    a = pool.alloc(10, 1)  # (class, extent, slot, generation)
    b = pool.alloc(20, 1)
    c = pool.alloc(30, L.HOST_OWNER)
    pool.free(*b)
    d = pool.alloc(200, L.HOST_OWNER)
    assert [(r[0], r[1]) for r in (a, b, c, d)] == [(0, 0)] * 3 + [(1, 0)]
    pool.write_payload(d[0], d[2], b"slot payload", d[1])
    assert seg.h2g(1).write_slot_ref(*d)
    seg.say_goodbye()
    return {
        "states": ["Attached", "Reserved", "Goodbye", "Empty"],
        "epochs": [1, 1, 1, 0],
        "used": {(1, "g2h"): 68, (1, "h2g"): 20, (2, "g2h"): 0, (2, "h2g"): 164, (3, "g2h"): 0, (3, "h2g"): 0, (4, "g2h"): 0, (4, "h2g"): 0},
        "indices": {(2, "h2g"): (100, 192, 128), (1, "g2h"): (88, 0, 20), (1, "h2g"): (20, 0, 0)},
        "counts": [(2, 2), (1, 1)],  # (free, allocated) per class
        "tags": [4, 1],  # class 0: 3 allocs + 1 free; class 1: 1 alloc
    }


@pytest.fixture
def busy_segment(shm_path):
    with Segment.create(CFG, path=shm_path) as seg:
        expected = make_traffic(seg)
        yield seg, shm_path, expected


@pytest.mark.timeout(120)
def test_json_matches_the_segment_state(busy_segment):
    seg, path, exp = busy_segment
    res = run_cli(path, "--json")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    info = json.loads(res.stdout)
    lay = seg.layout

    assert info["schema"] == INSPECT_SCHEMA == 1
    h = info["header"]
    assert seg.features == L.KNOWN_FEATURES  # Segment.create's default: every known bit
    assert h == {
        "magic": "ROAMHUB\x07",
        "version": 7,
        "header_size": 128,
        "total_size": lay.total_size,
        "current_size": lay.total_size,
        "max_payload_size": 1 << 20,
        "inline_threshold": 100,
        "effective_inline_threshold": 100,
        "max_guests": 4,
        "bipbuf_capacity": 256,
        "peer_table_offset": 128,
        "var_pool_offset": lay.var_pool_offset,
        "heartbeat_interval_ns": 5_000_000,
        "host_goodbye": 1,
        "num_var_slot_classes": 2,
        "features": L.KNOWN_FEATURES,
        "attention": 0,
        "share_links": 0,  # no host set shares on this hand-made segment
        "file_size": os.path.getsize(path),
    }
    assert h["file_size"] == lay.total_size

    peers = info["peers"]
    assert [p["peer_id"] for p in peers] == [1, 2, 3, 4]
    assert [p["state"] for p in peers] == exp["states"]
    assert [p["epoch"] for p in peers] == exp["epochs"]
    assert peers[0]["last_heartbeat"] > 0 and peers[2]["last_heartbeat"] > 0  # attach and claim write one
    assert peers[1]["last_heartbeat"] == 0 and peers[3]["last_heartbeat"] == 0
    for p in peers:
        pid = p["peer_id"]
        assert p["ring_offset"] == lay.ring_offset(pid)
        for name, off in (("g2h", lay.g2h_offset(pid)), ("h2g", lay.h2g_offset(pid))):
            ring = p[name]
            assert (ring["offset"], ring["capacity"]) == (off, 256)
            assert ring["used"] == exp["used"][pid, name], (pid, name, ring)
            want = exp["indices"].get((pid, name), (0, 0, 0))
            assert (ring["write"], ring["watermark"], ring["read"]) == want, (pid, name, ring)
        zero = {"mappings": 0, "mapped_bytes": 0, "leases": 0}
        assert p["mmap"] == {"g2h": zero, "h2g": zero}  # no link ever sent through the mmap tier

    classes = info["slot_classes"]
    assert [c["class"] for c in classes] == [0, 1]
    for c, cls, (free, allocated), tag in zip(classes, lay.classes, exp["counts"], exp["tags"]):
        assert (c["slot_size"], c["slot_count"]) == (cls.slot_size, cls.slot_count)
        assert (c["free"], c["allocated"]) == (free, allocated)
        assert (c["header_offset"], c["meta_offset"], c["data_offset"]) == (cls.header_offset, cls.meta_offset, cls.data_offset)
        assert (c["free_head_tag"], c["free_head_index"]) == seg.pool.free_head(c["class"])
        assert c["free_head_tag"] == tag
        assert (c["extents"], c["max_extents"], c["extent_offsets"]) == (1, 1, [])


@pytest.mark.timeout(120)
def test_json_keys_and_types_are_the_documented_ones(busy_segment):
    seg, path, _ = busy_segment
    res = run_cli(path, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    check_documented_keys(info)


def check_documented_keys(info: dict) -> None:
    """Every key of the output is documented with its type, and every documented key is present
    (a conditional one exactly when its feature bit is set in header.features)."""
    doc = documented_objects()
    assert set(doc) == {"top", "header", "peer", "ring", "mmap", "mmap_direction", "slot_class"}
    features = info["header"]["features"]

    def check(obj, name):
        want = {k for k, (_, when) in doc[name].items() if when is None or features & getattr(L, when)}
        assert set(obj) == want, f"{name}: output keys {sorted(obj)} vs documented {sorted(want)} (features {features:#x})"
        for key in obj:
            typ = doc[name][key][0]
            assert typ in TYPES, f"{name}.{key}: unknown documented type {typ!r}"
            outer, inner = TYPES[typ] if isinstance(TYPES[typ], tuple) else (TYPES[typ], None)
            assert isinstance(obj[key], outer) and not isinstance(obj[key], bool), (name, key, obj[key])
            if inner is not None:
                assert all(isinstance(x, inner) and not isinstance(x, bool) for x in obj[key]), (name, key, obj[key])

    check(info, "top")
    check(info["header"], "header")
    for p in info["peers"]:
        check(p, "peer")
        check(p["g2h"], "ring")
        check(p["h2g"], "ring")
        if "mmap" in p:
            check(p["mmap"], "mmap")
            check(p["mmap"]["g2h"], "mmap_direction")
            check(p["mmap"]["h2g"], "mmap_direction")
    for c in info["slot_classes"]:
        check(c, "slot_class")


@pytest.mark.timeout(120)
def test_text_output_reports_the_same_numbers(busy_segment):
    seg, path, exp = busy_segment
    res = run_cli(path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"size {seg.layout.total_size} (current {seg.layout.total_size})" in out
    assert f"features {L.KNOWN_FEATURES:#x}" in out and "goodbye 1" in out and "inline 100 (effective 100)" in out
    assert "mmap" not in out  # counters all zero: no mmap line
    peer_lines = [ln for ln in out.splitlines() if re.match(r"^\s+\d+ (Empty|Attached|Goodbye|Reserved)\b", ln)]
    assert len(peer_lines) == 4
    for pid, (ln, state, epoch) in enumerate(zip(peer_lines, exp["states"], exp["epochs"]), start=1):
        fields = ln.split()
        assert fields[:4] == [str(pid), state, "epoch", str(epoch)], ln
        for name in ("g2h", "h2g"):
            w, wm, r = exp["indices"].get((pid, name), (0, 0, 0))
            assert f"{name} w={w} wm={wm} r={r} used={exp['used'][pid, name]}/256" in ln, (name, ln)
    class_lines = re.findall(
        r"^\s+(\d+) slot_size\s+(\d+)\s+count\s+(\d+)\s+free\s+(\d+)\s+allocated\s+(\d+)"
        r"\s+extents\s+(\d+)/(\d+)$",
        out,
        re.M,
    )
    assert [tuple(map(int, m)) for m in class_lines] == [
        (c, cls.slot_size, cls.slot_count, free, allocated, 1, 1) for c, (cls, (free, allocated)) in enumerate(zip(seg.layout.classes, exp["counts"]))
    ]


GROW_CFG = SegmentConfig(max_guests=2, bipbuf_capacity=256, max_payload_size=1 << 20, size_classes=((64, 4), (256, 2, 3), (1024, 1, 2)))


def _inspect_json(path: str) -> dict:
    res = run_cli(path, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.timeout(120)
def test_grown_class_reports_its_extents(shm_path):
    """After seg.grow_class(1): extents 2 of 3 with the offset the growth chose, the sizes follow,
    and the slots of the new extent count as free; the other classes are untouched."""
    with Segment.create(GROW_CFG, path=shm_path) as seg:
        lay = seg.layout
        before = _inspect_json(shm_path)
        assert [(c["extents"], c["max_extents"], c["extent_offsets"]) for c in before["slot_classes"]] == [(1, 1, []), (1, 3, []), (1, 2, [])]
        held = seg.alloc(200, L.HOST_OWNER)  # one slot of class 1, extent 0
        assert held[:2] == (1, 0)
        assert seg.grow_class(1)
        extent_off = L.align(lay.total_size, L.EXTENT_ALIGN)  # the first growth starts at the page after total_size
        extent_end = extent_off + L.extent_layout(256, 2)[1]
        assert seg.extent_offsets(1) == [extent_off] and seg.current_size == extent_end  # what the growth did
        info = _inspect_json(shm_path)
        text = run_cli(shm_path).stdout
        check_documented_keys(info)
        tag, head = seg.pool.free_head(1)

    h = info["header"]
    assert (h["total_size"], h["current_size"], h["file_size"]) == (lay.total_size, extent_end, extent_end)
    assert h["features"] == L.KNOWN_FEATURES
    c0, c1, c2 = info["slot_classes"]
    assert (c1["extents"], c1["max_extents"], c1["extent_offsets"]) == (2, 3, [extent_off])
    assert (c1["slot_count"], c1["free"], c1["allocated"]) == (2, 3, 1)  # 2 slots per extent, 1 held
    assert (c1["free_head_tag"], c1["free_head_index"]) == (tag, head) == (2, 2)  # one alloc, one publish; global index 1*2+0
    assert (c1["header_offset"], c1["meta_offset"], c1["data_offset"]) == (lay.classes[1].header_offset, lay.classes[1].meta_offset, lay.classes[1].data_offset)
    for c, want in ((c0, (1, 1, [], 4, 4, 0)), (c2, (1, 2, [], 1, 1, 0))):
        assert (c["extents"], c["max_extents"], c["extent_offsets"], c["slot_count"], c["free"], c["allocated"]) == want
    assert re.search(r"^\s+1 slot_size\s+256\s+count\s+2\s+free\s+3\s+allocated\s+1\s+extents 2/3$", text, re.M), text
    assert f"size {lay.total_size} (current {extent_end})" in text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("features", [0, L.FEATURE_WAITER_FLAGS, L.FEATURE_MMAP_LEASES, L.FEATURE_EXTENTS, L.FEATURE_RING_COUNTERS])
def test_keys_follow_the_feature_bits(shm_path, features):
    """A segment with one feature bit or none (features=0: plain v7): peers have an `mmap` key only
    with FEATURE_MMAP_LEASES, and a class configured as growable is growable only with
    FEATURE_EXTENTS (the segment, not the config, is what inspect reports)."""
    with Segment.create(GROW_CFG, path=shm_path, features=features) as seg:
        seg.peers.attach()
        info = _inspect_json(shm_path)
        text = run_cli(shm_path).stdout
        total = seg.layout.total_size
    check_documented_keys(info)
    h = info["header"]
    assert (h["features"], h["current_size"], h["file_size"]) == (features, total, total)
    assert f"features {features:#x}" in text
    assert [("mmap" in p) for p in info["peers"]] == [bool(features & L.FEATURE_MMAP_LEASES)] * 2
    growable = bool(features & L.FEATURE_EXTENTS)
    assert [(c["extents"], c["max_extents"], c["extent_offsets"]) for c in info["slot_classes"]] == [
        (1, 1, []),
        (1, 3 if growable else 1, []),
        (1, 2 if growable else 1, []),
    ]


@pytest.mark.timeout(120)
def test_mmap_counters_report_traffic_in_flight(shm_path):
    """An in-process host/guest Link pair sends payloads above the largest slot: the peer's `mmap`
    counters show the sender's mappings, their bytes and the leases the receiver has not released."""
    slot_max = GROW_CFG.max_slot_payload
    with Segment.create(GROW_CFG, path=shm_path) as seg:
        peer = seg.peers.reserve()
        seg.peers.claim(peer)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ca, cb = bigmap.socketpair()
        host = Link(seg, peer, Doorbell(a), HOST, control=ca)
        guest = Link(seg, peer, Doorbell(b), GUEST, control=cb)
        try:
            # Each payload needs one minimum-size mapping (header + payload fit in MIN_MAPPING).
            small, big = slot_max + 1, bigmap.MIN_MAPPING - L.MAP_HEADER_SIZE
            host.send(b"h" * small)  # H2G: 1 mapping, 1 lease
            guest.send(b"g" * big)  # G2H: the first mapping is leased, so a second one is made
            guest.send(b"G" * small)
            first = _inspect_json(shm_path)
            text = run_cli(shm_path).stdout

            msg = host.recv(timeout=5)  # G2H: one payload received and held, the other released
            assert (msg.tier, len(msg)) == ("mmap", big)
            assert host.recv_bytes(timeout=5) == b"G" * small
            assert guest.recv_bytes(timeout=5) == b"h" * small  # H2G: released
            held = _inspect_json(shm_path)
            msg.release()
            done = _inspect_json(shm_path)
            sent = (guest.mappings["tx_mappings"], host.mappings["tx_mappings"])
        finally:
            guest.close()
            host.close()
            host._close_maps()  # a host-side Link is torn down by Host recovery; do it by hand here
            host.doorbell.close()

    assert sent == (2, 1)
    mib = bigmap.MIN_MAPPING

    def counters(info):
        check_documented_keys(info)
        p1, p2 = info["peers"]
        zero = {"mappings": 0, "mapped_bytes": 0, "leases": 0}
        assert p2["mmap"] == {"g2h": zero, "h2g": zero}  # the other peer entry has no link
        return {d: (v["mappings"], v["mapped_bytes"], v["leases"]) for d, v in p1["mmap"].items()}

    assert counters(first) == {"g2h": (2, 2 * mib, 2), "h2g": (1, mib, 1)}
    assert counters(held) == {"g2h": (2, 2 * mib, 1), "h2g": (1, mib, 0)}
    assert counters(done) == {"g2h": (2, 2 * mib, 0), "h2g": (1, mib, 0)}  # mappings stay for reuse
    assert f"mmap g2h: 2 mappings, {2 * mib} bytes, 2 leases  h2g: 1 mappings, {mib} bytes, 1 leases" in text


@pytest.mark.timeout(60)
def test_anonymous_segment_through_proc_fd():
    """A memfd segment is inspectable through /proc/<pid>/fd/<fd> (docs/inspect.md)."""
    with Segment.create(CFG) as seg:
        seg.peers.attach()
        assert seg.g2h(1).write_inline(b"abc")
        res = run_cli(f"/proc/{os.getpid()}/fd/{seg.fd}", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["peers"][0]["state"] == "Attached"
    assert info["peers"][0]["g2h"]["used"] == 12


def _segment_bytes(**patch_u32) -> bytes:
    with Segment.create(CFG) as seg:
        for off, value in patch_u32.values():
            seg.region.store_u32(off, value)
        return seg.region.read(0, seg.size)


def _broken_inputs(tmp_path):
    rnd = random.Random(7)
    cases = {
        "missing": (str(tmp_path / "does-not-exist"), "SegmentError"),  # "cannot open segment PATH: <OS reason>"
        "directory": (str(tmp_path), "SegmentError"),
        "empty": (b"", "SegmentCorrupted"),
        "truncated": (_segment_bytes()[:100], "SegmentCorrupted"),
        "random": (rnd.randbytes(4096), "BadMagic"),
        "version": (_segment_bytes(v=(L.HDR_VERSION, 8)), "UnsupportedVersion"),
        "feature": (_segment_bytes(f=(L.HDR_FEATURES, 1 << 7)), "UnsupportedVersion"),
        "classes": (_segment_bytes(c=(L.HDR_NUM_CLASSES, 0)), "SegmentCorrupted"),
        "cut_pool": (_segment_bytes()[:-64], "SegmentCorrupted"),
    }
    out = {}
    for name, (content, err) in cases.items():
        if isinstance(content, bytes):
            path = tmp_path / f"{name}.seg"
            path.write_bytes(content)
            content = str(path)
        out[name] = (content, err)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("json_flag", [False, True])
def test_broken_inputs_exit_1_with_one_line(tmp_path, json_flag):
    for name, (path, err) in _broken_inputs(tmp_path).items():
        res = run_cli(path, *(["--json"] if json_flag else []))
        assert res.returncode == 1, (name, res.returncode, res.stdout, res.stderr)
        assert res.stdout == "", name
        lines = res.stderr.splitlines()
        assert len(lines) == 1, (name, res.stderr)
        assert lines[0].startswith(f"shmhub inspect: {err}: "), (name, lines[0])
        assert "Traceback" not in res.stderr
        if name == "missing":
            assert lines[0].endswith(f"cannot open segment {path}: No such file or directory"), lines[0]


@pytest.mark.timeout(120)
def test_corrupted_segments_never_crash_inspect(tmp_path):
    """Seeded byte flips anywhere in a busy segment: inspect either reports (0) or fails cleanly
    (1, one line); it never raises a traceback (in-process, so hundreds of cases stay cheap)."""
    with Segment.create(CFG) as seg:
        make_traffic(seg)
        good = seg.region.read(0, seg.size)
    rnd = random.Random(0xC0FFEE)
    path = tmp_path / "fuzz.seg"
    outcomes = {0: 0, 1: 0}
    for i in range(400):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            # half the flips in the header and peer table, where most checks live
            pos = rnd.randrange(len(data)) if rnd.random() < 0.5 else rnd.randrange(L.HEADER_SIZE + 4 * L.PEER_ENTRY_SIZE)
            data[pos] = rnd.randrange(256)
        if rnd.random() < 0.1:
            data = data[: rnd.randrange(len(data))]
        path.write_bytes(bytes(data))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["inspect", str(path), "--json"])
        assert rc in (0, 1), (i, rc)
        outcomes[rc] += 1
        if rc == 0:
            json.loads(out.getvalue())
        else:
            assert out.getvalue() == "" and len(err.getvalue().splitlines()) == 1, (i, err.getvalue())
    assert outcomes[0] > 0 and outcomes[1] > 0, outcomes
