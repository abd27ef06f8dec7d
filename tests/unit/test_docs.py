"""docs/format.md cannot drift from src/shmhub/layout.py, the single source of truth.

The doc keeps its tables machine-readable (docs/format.md, introduction); this module parses them
and checks every row against the constant it names.
"""

from __future__ import annotations

import ast
import collections
import os
import re
import struct

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub.cli import inspect_segment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "format.md")

# Upper-case constants of layout.py that are not part of the binary format.
NOT_FORMAT = {"ACCEPTED_MAGICS", "KIND_INLINE", "KIND_SLOT_REF", "KIND_MMAP_REF", "KIND_MMAP_RETURN", "U32_MAX", "U64_MAX"}

STRUCT_RE = re.compile(r"<!--\s*struct:\s*([\w-]+)\s+size=(\w+)(\s+packed)?\s*-->")
PIPE_RE = re.compile(r"(?<!\\)\|")


def _cells(line: str) -> list[str]:
    parts = PIPE_RE.split(line.strip())
    return [p.strip().replace("\\|", "|") for p in parts[1:-1]]


def _unquote(cell: str) -> str:
    return cell.strip().strip("`").strip()


def parse_tables(text: str) -> list[dict]:
    """Every markdown table: {"header", "rows", "line", "struct"}; struct is (name, size constant,
    comment line, packed) from a <!-- struct: NAME size=CONSTANT [packed] --> comment just above."""
    lines = text.splitlines()
    tables, i, last_struct = [], 0, None
    while i < len(lines):
        m = STRUCT_RE.search(lines[i])
        if m:
            last_struct = (m.group(1), m.group(2), i, bool(m.group(3)))
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s|:-]+\|$", lines[i + 1].strip()):
            header = _cells(lines[i])
            start = i
            i += 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append((i + 1, _cells(lines[i])))
                i += 1
            struct_info = last_struct if last_struct and start - last_struct[2] <= 2 else None
            tables.append({"header": header, "rows": rows, "line": start + 1, "struct": struct_info})
            continue
        i += 1
    return tables


def _int(cell: str) -> int:
    return int(_unquote(cell), 0)


@pytest.fixture(scope="module")
def tables():
    with open(DOC, encoding="utf-8") as f:
        return parse_tables(f.read())


def by_kind(tables, first: str):
    return [t for t in tables if t["header"] and t["header"][0] == first]


def format_constants() -> dict:
    return {n: v for n, v in vars(L).items() if n.isupper() and n not in NOT_FORMAT and isinstance(v, (int, bytes))}


def test_doc_has_the_expected_tables(tables):
    offsets = by_kind(tables, "Off")
    assert {t["struct"][0] for t in offsets if t["struct"]} == {
        "segment-header",
        "peer-entry",
        "ring-header",
        "frame-header",
        "slot-ref-body",
        "mmap-ref-body",
        "class-header",
        "slot-meta",
        "slot-data-prefix",
        "mmap-attach",
        "mapping-header",
        "bootstrap-response",
    }
    assert {t["struct"][0] for t in offsets if t["struct"] and t["struct"][3]} == {"bootstrap-response"}
    assert len(by_kind(tables, "Constant")) >= 1
    assert len(by_kind(tables, "Expression (golden config)")) == 1
    assert len(by_kind(tables, "Bit")) == 1


def test_every_offset_table_matches_layout(tables):
    offsets = by_kind(tables, "Off")
    assert offsets
    for t in offsets:
        assert t["header"][:4] == ["Off", "Size", "Field", "Constant"], t["line"]
        assert t["struct"], f"table at line {t['line']} lacks a <!-- struct: NAME size=CONSTANT --> comment"
        name, size_const, _, packed = t["struct"]
        assert hasattr(L, size_const), f"{name}: size constant {size_const} is not in layout.py"
        pos = 0
        for line, cells in t["rows"]:
            off, size, field, const = _int(cells[0]), _int(cells[1]), cells[2], _unquote(cells[3])
            assert off == pos, f"{name} line {line}: {field} at {off}, but the previous field ends at {pos}"
            assert size > 0
            if const in ("—", "-", ""):
                assert re.search(r"reserved|pad|payload_len", field), f"{name} line {line}: {field} has no constant"
            else:
                assert hasattr(L, const), f"{name} line {line}: {const} is not a layout.py constant"
                assert getattr(L, const) == off, f"{name} line {line}: {field} documented at {off}, {const} = {getattr(L, const)}"
                if not packed:
                    assert off % min(size, 8) == 0 or size not in (2, 4, 8), f"{name} line {line}: {field} is misaligned"
            pos = off + size
        assert pos == getattr(L, size_const), f"{name}: rows end at {pos}, {size_const} = {getattr(L, size_const)}"


def test_header_reserved_bytes_end_where_layout_says(tables):
    (header,) = [t for t in by_kind(tables, "Off") if t["struct"] and t["struct"][0] == "segment-header"]
    line, last = header["rows"][-1]
    assert _int(last[0]) + _int(last[1]) == L.HDR_RESERVED_END


def test_constants_tables_match_layout(tables):
    for t in by_kind(tables, "Constant"):
        assert t["header"][:2] == ["Constant", "Value"]
        for line, cells in t["rows"]:
            name, value = _unquote(cells[0]), _unquote(cells[1])
            assert hasattr(L, name), f"line {line}: {name} is not a layout.py constant"
            assert ast.literal_eval(value) == getattr(L, name), f"line {line}: {name} documented as {value}, is {getattr(L, name)!r}"


def _documented_rows(tables) -> list:
    """(constant, line) of every table row that documents a constant."""
    rows = []
    for kind, col in (("Off", 3), ("Constant", 0), ("Bit", 2)):
        for t in by_kind(tables, kind):
            rows += [(_unquote(c[col]), line) for line, c in t["rows"] if _unquote(c[col]) not in ("—", "-", "")]
    return rows


def test_every_format_constant_is_documented(tables):
    named = {name for name, _ in _documented_rows(tables)}
    named |= {t["struct"][1] for t in by_kind(tables, "Off")}
    missing = sorted(set(format_constants()) - named)
    assert not missing, f"layout.py constants missing from docs/format.md: {missing}"


def test_each_constant_has_one_documented_place(tables):
    lines = collections.defaultdict(list)
    for name, line in _documented_rows(tables):
        lines[name].append(line)
    twice = {name: ls for name, ls in lines.items() if len(ls) > 1}
    assert not twice, f"constants documented in more than one row (lines): {twice}"


def test_worked_example_is_what_layout_computes(tables):
    (t,) = by_kind(tables, "Expression (golden config)")
    lay = L.Layout.compute(2, 128, ((1024, 4), (16384, 2)))
    assert len(t["rows"]) >= 10
    for line, cells in t["rows"]:
        expr = _unquote(cells[0])
        assert re.fullmatch(r"lay(\.\w+|\[\d+\]|\(\d+\))+", expr), f"line {line}: not a plain attribute path: {expr}"
        assert eval(expr, {"__builtins__": {}}, {"lay": lay}) == _int(cells[1]), f"line {line}: {expr}"


def test_feature_table_lists_exactly_the_known_bits(tables):
    (t,) = by_kind(tables, "Bit")
    assert t["header"][:3] == ["Bit", "Mask", "Constant"]
    mask = 0
    for line, cells in t["rows"]:
        bit, m, name = _int(cells[0]), _int(cells[1]), _unquote(cells[2])
        assert m == 1 << bit, f"line {line}: mask {m:#x} is not bit {bit}"
        assert getattr(L, name, None) == m, f"line {line}: {name} is not a layout.py constant equal to {m:#x}"
        assert not mask & m, f"line {line}: bit {bit} listed twice"
        mask |= m
    assert mask == L.KNOWN_FEATURES, f"documented feature bits {mask:#x} != KNOWN_FEATURES {L.KNOWN_FEATURES:#x}"


def test_header_table_decodes_a_real_segment(tables):
    """Read a freshly created segment through the documented offsets and sizes: every field
    agrees with what inspect reports (so the Size column is right, not only the offsets)."""
    (header,) = [t for t in by_kind(tables, "Off") if t["struct"] and t["struct"][0] == "segment-header"]
    cfg = SegmentConfig(
        max_guests=3,
        bipbuf_capacity=192,
        max_payload_size=0x01020304,
        inline_threshold=0x0506,
        heartbeat_interval_ns=0x0A0B0C0D0E0F,
        size_classes=((64, 3), (320, 2)),
    )
    with Segment.create(cfg) as seg:
        raw = seg.region.read(0, L.HEADER_SIZE)
        info = inspect_segment(seg)["header"]
    alias = {"heartbeat_interval": "heartbeat_interval_ns"}
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
    checked = 0
    for _, cells in header["rows"]:
        off, size, field = _int(cells[0]), _int(cells[1]), cells[2]
        chunk = raw[off : off + size]
        if field == "magic":
            assert chunk == L.MAGIC
        elif field == "reserved":
            assert chunk == bytes(size)
        else:
            assert struct.unpack(fmt[size], chunk)[0] == info[alias.get(field, field)], field
        checked += 1
    assert checked == len(header["rows"]) == 18


def _decode(raw: bytes, table: dict) -> dict:
    """{field: value} of raw bytes read through a documented offset table: integers of 1, 2, 4 or 8
    bytes (little-endian); padding, reserved bytes and arrays as bytes."""
    fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
    out = {}
    for _, cells in table["rows"]:
        off, size, field = _int(cells[0]), _int(cells[1]), cells[2]
        assert field not in out, field
        chunk = raw[off : off + size]
        out[field] = chunk if size not in fmt or re.search(r"pad|reserved", field) else struct.unpack(fmt[size], chunk)[0]
    return out


def test_class_header_table_decodes_a_grown_class(tables):
    """The class header rows (v7 and FEATURE_EXTENTS fields) read a real class after a growth and a
    growth request: every field agrees with inspect and with what was done."""
    (header,) = [t for t in by_kind(tables, "Off") if t["struct"] and t["struct"][0] == "class-header"]
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=64, size_classes=((64, 3), (128, 2, 4)))
    with Segment.create(cfg) as seg:
        assert seg.grow_class(1)
        assert seg.request_growth(100)  # the next growth of class 1
        info = inspect_segment(seg)["slot_classes"]
        fields = [_decode(seg.region.read(c.header_offset, L.CLASS_HEADER_SIZE), header) for c in seg.layout.classes]
        requests = seg.growth_requests()
        current = seg.current_size
    assert requests == [1]
    for c, (f, i) in enumerate(zip(fields, info)):
        assert (f["slot_size"], f["slot_count"]) == (i["slot_size"], i["slot_count"]) == cfg.size_classes[c][:2]
        assert f["free_head"] == i["free_head_tag"] << 32 | i["free_head_index"]
        assert f["waiters"] & L.POOL_WAITERS_MASK == i["waiters"] == 0  # bits 1.. are the wake sequence
        offsets = struct.unpack(f"<{L.MAX_EXTENTS - 1}Q", f["extent_offsets"])
        if c == 0:  # not growable: the extension fields stay zero (read as one extent)
            assert (f["extent_count"], f["max_extents"], f["grow_request"], offsets) == (0, 0, 0, (0,) * (L.MAX_EXTENTS - 1))
            assert (i["extents"], i["max_extents"], i["extent_offsets"]) == (1, 1, [])
            continue
        assert (f["extent_count"], f["max_extents"], f["grow_request"]) == (i["extents"], i["max_extents"], 1) == (2, 4, 1)
        assert list(offsets[:1]) == i["extent_offsets"] == [L.align(seg.layout.total_size, L.EXTENT_ALIGN)]
        assert offsets[1:] == (0,) * (L.MAX_EXTENTS - 2)
        assert current == offsets[0] + L.extent_layout(128, 2)[1]


NARRATIVE_DOCS = ("format.md", "extensions.md", "bootstrap.md", "inspect.md")


def test_prose_names_only_real_constants():
    """The narrative docs point to docs/format.md by constant name: every backticked name of a
    layout.py family (FEATURE_*, PEER_*, CLS_*, BOOTSTRAP_*, ...) must exist, and a stated value
    (`NAME` = 7) must be its value, so renaming a constant cannot leave a dangling reference."""
    families = {n.split("_")[0] for n in format_constants() if "_" in n}
    checked = 0
    for doc in NARRATIVE_DOCS:
        with open(os.path.join(ROOT, "docs", doc), encoding="utf-8") as f:
            text = f.read()
        for m in re.finditer(r"`([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)`(?:\s*=\s*(0x[0-9A-Fa-f]+|\d+)\b)?", text):
            name, value = m.groups()
            if name.split("_")[0] not in families:
                continue  # SCM_RIGHTS, MSG_NOSIGNAL, ...
            assert hasattr(L, name), f"docs/{doc} names {name}, which layout.py does not define"
            if value is not None:
                assert getattr(L, name) == int(value, 0), f"docs/{doc} says {name} = {value}, it is {getattr(L, name)}"
            checked += 1
    assert checked > 50


def test_extensions_doc_has_one_section_per_known_bit():
    with open(os.path.join(ROOT, "docs", "extensions.md"), encoding="utf-8") as f:
        bits = re.findall(r"^## Bit (\d+) — `(FEATURE_\w+)`", f.read(), re.M)
    for b, name in bits:
        assert getattr(L, name, None) == 1 << int(b), f"docs/extensions.md: bit {b} is not {name}"
    assert sum(1 << int(b) for b, _ in bits) == L.KNOWN_FEATURES and len(set(bits)) == len(bits)
