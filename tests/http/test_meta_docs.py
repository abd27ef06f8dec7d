"""docs/http.md cannot drift from src/shmhub/http/_meta.py: every table row is checked against the
constant it names, every constant is documented, and the byte-by-byte examples are what the
encoder writes (the table parser is the one of tests/rpc/test_wire_docs.py)."""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any, Dict, List

import pytest

from shmhub.http import _meta as M
from shmhub.http import RequestMeta, ResponseMeta, decode_request, decode_response, encode_request, encode_response

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "http.md")
FMT = {1: "B", 2: "H", 4: "I", 8: "Q"}

_spec = importlib.util.spec_from_file_location("_rpc_wire_docs", os.path.join(ROOT, "tests", "rpc", "test_wire_docs.py"))
assert _spec is not None and _spec.loader is not None
_wire_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_wire_docs)


@pytest.fixture(scope="module")
def docs() -> List[Dict[str, Any]]:
    return _wire_docs.tables(DOC)


def const(cell: str) -> str:
    return cell.strip().strip("`")


def test_header_tables_match_the_structs(docs):
    structs = {t["struct"][0]: t for t in docs if t["struct"]}
    assert set(structs) == {"http-request-header", "http-response-header"}
    for name, packer in (("http-request-header", M.REQUEST_HEADER), ("http-response-header", M.RESPONSE_HEADER)):
        t = structs[name]
        assert getattr(M, t["struct"][1]) == packer.size
        off, fmt = 0, "<"
        for row in t["rows"]:
            o, n, field, c = int(row[0]), int(row[1]), row[2], const(row[3])
            assert o == off, f"{name}.{field}: documented at {o}, previous field ends at {off}"
            assert getattr(M, c) == o, f"{name}.{field}: {c} is {getattr(M, c)}, documented {o}"
            off += n
            fmt += FMT[n]
        assert off == packer.size and fmt == packer.format, name


def test_method_table_lists_exactly_the_codes(docs):
    (t,) = [t for t in docs if t["header"] == ["Method", "Code"]]
    assert {r[0]: int(r[1]) for r in t["rows"]} == {m.name: int(m) for m in M.Method}


def test_constants_table_matches(docs):
    (t,) = [t for t in docs if t["header"][:2] == ["Constant", "Value"]]
    for row in t["rows"]:
        assert getattr(M, const(row[0])) == int(row[1], 0), row


def test_every_constant_is_documented():
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    names = [n for n, v in vars(M).items() if n.isupper() and isinstance(v, int) and not isinstance(v, bool)]
    missing = [n for n in names if f"`{n}`" not in text]
    assert not missing, f"constants of _meta.py missing from docs/http.md: {missing}"


def example(name: str) -> bytes:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    m = re.search(rf"<!-- example: {name} -->\s*```text\n(.*?)```", text, re.S)
    assert m, f"example {name} not found"
    # Each line: hex bytes, then two spaces and a comment.
    return bytes.fromhex(" ".join(line.split("  ")[0] for line in m.group(1).splitlines()))


def test_the_documented_examples_are_what_the_encoder_writes():
    req = RequestMeta("PURGE", "/a", raw_path=b"/a", query=b"x=1", headers=((b"x-k", b"1"), (b"x-k", b"2")))
    assert encode_request(req) == example("request")
    assert decode_request(example("request")) == req
    resp = ResponseMeta(200, ((b"content-type", b"text/plain"),))
    assert encode_response(resp) == example("response")
    assert decode_response(example("response")) == resp
