"""Shared by tests/link/test_mmap.py and the mmap_* guest scripts: seeded pseudo-random payloads
that are cheap to build at any size, their digests, and /proc probes.

content(seed, n): a random 1 MiB block (from the seed), repeated; the first 8 bytes of every
1 MiB chunk are replaced by the chunk index, so a dropped, repeated or swapped chunk changes the
digest. digest(seed, n) computes the same digest chunk by chunk without building the payload."""

from __future__ import annotations

import hashlib
import os
import random
import struct

CHUNK = 1 << 20


def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


def _chunks(seed: int, n: int):
    blk = _block(seed)
    for i, off in enumerate(range(0, n, CHUNK)):
        k = min(CHUNK, n - off)
        yield (struct.pack("<Q", i) + blk[8:k])[:k]


def content(seed: int, n: int) -> bytearray:
    buf = bytearray(n)
    mv = memoryview(buf)
    blk = _block(seed)
    for i, off in enumerate(range(0, n, CHUNK)):
        k = min(CHUNK, n - off)
        mv[off : off + k] = blk[:k]
        h = min(8, k)
        mv[off : off + h] = struct.pack("<Q", i)[:h]
    mv.release()
    return buf


def hash_of(data) -> str:
    """sha256 (hardware accelerated here: about twice as fast as blake2b) of a bytes-like object."""
    return hashlib.sha256(data).hexdigest()


def digest(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for c in _chunks(seed, n):
        h.update(c)
    return h.hexdigest()


# -- /proc probes (any pid of the same user) ----------------------------------------------------


def rss_kib(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid="self") -> int:
    """Open fds, less the links' private close wake-up eventfds (made the first time a thread
    sleeps on a link, closed with it)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventfd]"
        except FileNotFoundError:
            pass
    return n


def map_inodes(pid="self", name: str = "memfd:shmhub-map") -> set:
    """Inodes of the memfd mappings named `name` in the process's address space."""
    out = set()
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if name in line:
                out.add(int(line.split()[4]))
    return out
