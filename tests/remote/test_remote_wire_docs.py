"""docs/remote.md's wire format cannot drift from src/shmhub/remote/_wire.py: the header table,
the kinds, and each byte-by-byte example (encoded and decoded)."""

from __future__ import annotations

import os
import re

from pathlib import Path

import pytest

from shmhub import LinkCorrupted
from shmhub.remote import _wire as W

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "remote.md")


def table_after(marker: str) -> list:
    lines = Path(DOC).read_text(encoding="utf-8").splitlines()
    i = lines.index(marker) + 1
    while not lines[i].startswith("|"):
        i += 1
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_the_header_table_matches():
    rows = table_after("<!-- struct: remote-control -->")
    assert [(int(r[0]), r[1], r[2]) for r in rows] == [(0, "4", "magic"), (4, "1", "version"), (5, "1", "kind"), (6, "...", "body")]
    assert rows[0][3] == f"`{W.MAGIC.decode()}`" and int(rows[1][3]) == W.VERSION
    lines = Path(DOC).read_text(encoding="utf-8").splitlines()
    kinds = [r for r in (line.strip().strip("|").split("|") for line in lines if re.match(r"^\| [A-Z]+ \| \d \|", line))]
    assert {k[0].strip(): int(k[1]) for k in kinds} == {k.name: int(k) for k in W.Kind}


EXAMPLES = {
    "HELLO pid 4660 name `w1`": W.Control(W.Kind.HELLO, pid=4660, text="w1"),
    "WELCOME port 5556": W.Control(W.Kind.WELCOME, port=5556),
    "BYE": W.Control(W.Kind.BYE),
    "REFUSE `full`": W.Control(W.Kind.REFUSE, text="full"),
}


def test_every_example_encodes_and_decodes_as_documented():
    rows = table_after("<!-- examples: remote-control -->")
    assert [r[0] for r in rows] == list(EXAMPLES)
    for name, hexes in rows:
        data = bytes.fromhex(hexes.strip("`").replace(" ", ""))
        assert W.encode(EXAMPLES[name]) == data, name
        assert W.decode(data) == EXAMPLES[name], name


@pytest.mark.parametrize(
    "data",
    [b"", b"SHMR\x01", b"XXXX\x01\x03", b"SHMR\x02\x03", b"SHMR\x01\x09", b"SHMR\x01\x03x", b"SHMR\x01\x02\x01", b"SHMR\x01\x01\x01\x00", b"SHMR\x01\x04\xff"],
)
def test_malformed_control_messages_are_link_corrupted(data):
    with pytest.raises(LinkCorrupted):
        W.decode(data)


def test_the_public_surface_is_pinned():
    import shmhub.remote

    assert shmhub.remote.__all__ == sorted(shmhub.remote.__all__)
    assert shmhub.remote.__all__ == ["DEFAULT_LIVENESS", "Listener", "RemoteGuest", "RemoteLink", "RemoteStats", "connect"]


def test_import_shmhub_does_not_import_pyzmq():
    import subprocess
    import sys

    code = "import sys, shmhub; assert 'zmq' not in sys.modules and 'shmhub.remote' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
