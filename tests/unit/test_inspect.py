"""`python -m shmhub inspect PATH [--json]` (docs/inspect.md) on a segment with traffic in flight:
the JSON and the text report must match the state, the documented schema must match the JSON,
and broken inputs must give exit status 2 with a one-line error."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import subprocess
import sys

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub.cli import INSPECT_SCHEMA, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "inspect.md")
CFG = SegmentConfig(max_guests=4, bipbuf_capacity=256, max_payload_size=1 << 20, inline_threshold=100,
                    heartbeat_interval_ns=5_000_000, size_classes=((64, 4), (256, 2)))
TYPES = {"int": int, "string": str, "object": dict, "array of object": list}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "shmhub", "inspect", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def documented_objects() -> dict:
    """{object name: {key: type}} from the <!-- inspect-object: NAME --> tables of docs/inspect.md."""
    with open(DOC, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, current = {}, None
    for line in lines:
        m = re.match(r"<!--\s*inspect-object:\s*(\w+)\s*-->", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            current[cells[0].strip("`")] = cells[1]
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
    a = pool.alloc(10, 1)
    b = pool.alloc(20, 1)
    c = pool.alloc(30, L.HOST_OWNER)
    pool.free(b[0], 0, b[1], b[2])
    d = pool.alloc(200, L.HOST_OWNER)
    assert (a[0], c[0], d[0]) == (0, 0, 1)
    pool.write_payload(d[0], d[1], b"slot payload")
    assert seg.h2g(1).write_slot_ref(d[0], 0, d[1], d[2])
    seg.say_goodbye()
    return {
        "states": ["Attached", "Reserved", "Goodbye", "Empty"],
        "epochs": [1, 1, 1, 0],
        "used": {(1, "g2h"): 68, (1, "h2g"): 20, (2, "g2h"): 0, (2, "h2g"): 164, (3, "g2h"): 0, (3, "h2g"): 0,
                 (4, "g2h"): 0, (4, "h2g"): 0},
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
    assert h == {
        "magic": "ROAMHUB\x07", "version": 7, "header_size": 128, "total_size": lay.total_size,
        "current_size": lay.total_size, "max_payload_size": 1 << 20, "inline_threshold": 100,
        "effective_inline_threshold": 100, "max_guests": 4, "bipbuf_capacity": 256,
        "peer_table_offset": 128, "var_pool_offset": lay.var_pool_offset, "heartbeat_interval_ns": 5_000_000,
        "host_goodbye": 1, "num_var_slot_classes": 2, "features": 0,
    }

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

    classes = info["slot_classes"]
    assert [c["class"] for c in classes] == [0, 1]
    for c, cls, (free, allocated), tag in zip(classes, lay.classes, exp["counts"], exp["tags"]):
        assert (c["slot_size"], c["slot_count"]) == (cls.slot_size, cls.slot_count)
        assert (c["free"], c["allocated"]) == (free, allocated)
        assert (c["header_offset"], c["meta_offset"], c["data_offset"]) == (cls.header_offset, cls.meta_offset, cls.data_offset)
        assert (c["free_head_tag"], c["free_head_index"]) == seg.pool.free_head(c["class"])
        assert c["free_head_tag"] == tag


@pytest.mark.timeout(120)
def test_json_keys_and_types_are_the_documented_ones(busy_segment):
    seg, path, _ = busy_segment
    res = run_cli(path, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    doc = documented_objects()
    assert set(doc) == {"top", "header", "peer", "ring", "slot_class"}

    def check(obj, name):
        assert set(obj) == set(doc[name]), f"{name}: output keys {sorted(obj)} vs documented {sorted(doc[name])}"
        for key, typ in doc[name].items():
            assert typ in TYPES, f"{name}.{key}: unknown documented type {typ!r}"
            assert isinstance(obj[key], TYPES[typ]) and not isinstance(obj[key], bool), (name, key, obj[key])

    check(info, "top")
    check(info["header"], "header")
    for p in info["peers"]:
        check(p, "peer")
        check(p["g2h"], "ring")
        check(p["h2g"], "ring")
    for c in info["slot_classes"]:
        check(c, "slot_class")


@pytest.mark.timeout(120)
def test_text_output_reports_the_same_numbers(busy_segment):
    seg, path, exp = busy_segment
    res = run_cli(path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"size {seg.layout.total_size} (current {seg.layout.total_size})" in out
    assert "features 0x0" in out and "goodbye 1" in out and "inline 100 (effective 100)" in out
    peer_lines = [ln for ln in out.splitlines() if re.match(r"^\s+\d+ (Empty|Attached|Goodbye|Reserved)\b", ln)]
    assert len(peer_lines) == 4
    for pid, (ln, state, epoch) in enumerate(zip(peer_lines, exp["states"], exp["epochs"]), start=1):
        fields = ln.split()
        assert fields[:4] == [str(pid), state, "epoch", str(epoch)], ln
        for name in ("g2h", "h2g"):
            w, wm, r = exp["indices"].get((pid, name), (0, 0, 0))
            assert f"{name} w={w} wm={wm} r={r} used={exp['used'][pid, name]}/256" in ln, (name, ln)
    class_lines = re.findall(r"^\s+(\d+) slot_size\s+(\d+)\s+count\s+(\d+)\s+free\s+(\d+)\s+allocated\s+(\d+)$", out, re.M)
    assert [tuple(map(int, m)) for m in class_lines] == [
        (c, cls.slot_size, cls.slot_count, free, allocated)
        for c, (cls, (free, allocated)) in enumerate(zip(seg.layout.classes, exp["counts"]))
    ]


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
        "missing": (str(tmp_path / "does-not-exist"), "FileNotFoundError"),
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
def test_broken_inputs_exit_2_with_one_line(tmp_path, json_flag):
    for name, (path, err) in _broken_inputs(tmp_path).items():
        res = run_cli(path, *(["--json"] if json_flag else []))
        assert res.returncode == 2, (name, res.returncode, res.stdout, res.stderr)
        assert res.stdout == "", name
        lines = res.stderr.splitlines()
        assert len(lines) == 1, (name, res.stderr)
        assert lines[0].startswith(f"shmhub inspect: {err}: "), (name, lines[0])
        assert "Traceback" not in res.stderr


@pytest.mark.timeout(120)
def test_corrupted_segments_never_crash_inspect(tmp_path):
    """Seeded byte flips anywhere in a busy segment: inspect either reports (0) or fails cleanly
    (2, one line); it never raises a traceback (in-process, so hundreds of cases stay cheap)."""
    with Segment.create(CFG) as seg:
        make_traffic(seg)
        good = seg.region.read(0, seg.size)
    rnd = random.Random(0xC0FFEE)
    path = tmp_path / "fuzz.seg"
    outcomes = {0: 0, 2: 0}
    for i in range(400):
        data = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            # half the flips in the header and peer table, where most checks live
            pos = rnd.randrange(len(data)) if rnd.random() < 0.5 else rnd.randrange(L.HEADER_SIZE + 4 * L.PEER_ENTRY_SIZE)
            data[pos] = rnd.randrange(256)
        if rnd.random() < 0.1:
            data = data[:rnd.randrange(len(data))]
        path.write_bytes(bytes(data))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["inspect", str(path), "--json"])
        assert rc in (0, 2), (i, rc)
        outcomes[rc] += 1
        if rc == 0:
            json.loads(out.getvalue())
        else:
            assert out.getvalue() == "" and len(err.getvalue().splitlines()) == 1, (i, err.getvalue())
    assert outcomes[0] > 0 and outcomes[2] > 0, outcomes
