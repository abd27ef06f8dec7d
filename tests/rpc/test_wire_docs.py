"""docs/rpc.md cannot drift from src/shmhub/rpc/_wire.py: every documented row is checked
against the constant it names, and every wire constant is documented (as tests/unit/test_docs.py
does for docs/format.md)."""

from __future__ import annotations

import os
import re

import pytest

from shmhub import rpc
from shmhub.rpc import _wire as W

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "rpc.md")
STRUCT_RE = re.compile(r"<!--\s*struct:\s*([\w-]+)\s+size=(\w+)\s*-->")
SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def tables(doc: str = DOC) -> list:
    with open(doc, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, i, struct_name = [], 0, None
    while i < len(lines):
        m = STRUCT_RE.search(lines[i])
        if m:
            struct_name = (m.group(1), m.group(2), i)
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s|:-]+\|$", lines[i + 1].strip()):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            start, i = i, i + 2
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            st = struct_name if struct_name and start - struct_name[2] <= 2 else None
            out.append({"header": header, "rows": rows, "struct": st})
            continue
        i += 1
    return out


def const(cell: str) -> str:
    return cell.strip().strip("`")


@pytest.fixture(scope="module")
def docs():
    return tables()


def test_struct_tables_match_the_structs(docs):
    structs = {t["struct"][0]: t for t in docs if t["struct"]}
    assert set(structs) == {"rpc-header", "rpc-buffer-descriptor"}
    for name, packer in (("rpc-header", W.HEADER), ("rpc-buffer-descriptor", W.DESCRIPTOR)):
        t = structs[name]
        size = getattr(W, t["struct"][1])
        assert size == packer.size
        off = 0
        fmt = "<"
        for row in t["rows"]:
            o, n, field, c = int(row[0]), int(row[1]), row[2], const(row[3])
            assert o == off, f"{name}.{field}: documented at {o}, previous field ends at {off}"
            assert getattr(W, c) == o, f"{name}.{field}: {c} is {getattr(W, c)}, documented {o}"
            off += n
            fmt += FMT[n]
        assert off == size, f"{name}: fields end at {off}, the struct is {size} bytes"
        assert fmt == packer.format, f"{name}: documented layout {fmt} != struct {packer.format}"


def test_kinds_table_lists_exactly_the_kinds(docs):
    (t,) = [t for t in docs if t["header"][0] == "Kind"]
    assert {r[0]: int(r[1]) for r in t["rows"]} == {k.name: int(k) for k in W.Kind}


def test_constants_table_matches(docs):
    (t,) = [t for t in docs if t["header"][:2] == ["Constant", "Value"]]
    for row in t["rows"]:
        assert getattr(W, const(row[0])) == int(row[1], 0), row


def test_every_wire_constant_is_documented():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    # Kind members (and their K_* aliases) are checked against the kinds table above.
    names = [n for n, v in vars(W).items() if n.isupper() and isinstance(v, int) and not isinstance(v, (bool, W.Kind))]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"constants of _wire.py missing from docs/rpc.md: {missing}"


def test_public_surface_is_pinned():
    assert rpc.__all__ == sorted(rpc.__all__)
    assert rpc.__all__ == [
        "BytesCodec",
        "Client",
        "Codec",
        "DeadlineExceeded",
        "MethodNotFound",
        "MsgspecCodec",
        "PickleCodec",
        "RemoteError",
        "RpcError",
        "RpcProtocolError",
        "Server",
        "Stream",
        "aserve",
        "cancelled",
        "inline",
        "serve",
    ]
    for name in rpc.__all__:
        assert getattr(rpc, name) is not None
    import shmhub

    assert issubclass(rpc.DeadlineExceeded, shmhub.ShmTimeout) and issubclass(rpc.DeadlineExceeded, TimeoutError)
    assert issubclass(rpc.RpcProtocolError, shmhub.LinkCorrupted)
    for name in ("RpcError", "RpcProtocolError", "DeadlineExceeded", "RemoteError", "MethodNotFound"):
        assert name in shmhub.__all__
