"""Shared by the stress tests and their child processes (children import it from this folder).

Payload plan: frame i of a ring stream is fully determined by (seed, i), so the producer and the
consumer agree on its kind (inline or slot reference), its size and its bytes without talking.
A payload of n >= 8 bytes is `[u32 seq][u32 crc32(body, seq)][body]`, the body being a slice of
a seeded random buffer (cheap: no per-frame random generation). A payload shorter than 8 bytes is
the first n bytes of that 8-byte header (the consumer compares it whole).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
HDR = struct.Struct("<II")
EMPTY_INDEX = 0xFFFFFFFF
BUF_SIZE = 1 << 16
# Busy-poll budget. A waiter polls with cpu_relax(); after SPINS consecutive failed polls it also
# calls backoff(), which yields the CPU and, after 2 x SPINS, sleeps 50 us per poll. On an idle
# machine the other side answers long before that; on an oversubscribed one a pure spin would
# burn the time slice the other side needs, and a sleeper gets scheduled promptly on wakeup.
SPINS = 200
_BACKOFF = os.environ.get("SHMHUB_STRESS_BACKOFF", "sleep")


def backoff(spins: int) -> None:
    if _BACKOFF == "yield" or spins <= 2 * SPINS:
        os.sched_yield()
    else:
        time.sleep(50e-6)


class PayloadPlan:
    """Deterministic frame plan. `slot_per_256` of every 256 frames (on average) go by slot
    reference with 1..max_slot bytes; the others inline with 1..max_inline bytes (half of those
    are drawn from 1..64 so that small, densely packed frames are common too)."""

    def __init__(self, n: int, seed: int, max_inline: int, max_slot: int, slot_per_256: int) -> None:
        rng = random.Random(seed)
        self.n = n
        self.max_inline = max_inline
        self.max_slot = max_slot
        self.slot_per_256 = slot_per_256
        self.buf = rng.randbytes(BUF_SIZE + max(max_inline, max_slot))
        self.words = array("I")
        self.words.frombytes(rng.randbytes(4 * n))
        if sys.byteorder != "little":
            self.words.byteswap()

    def params(self, i: int):
        """(is_slot, size, buffer offset) of frame i."""
        v = self.words[i]
        if (v & 0xFF) < self.slot_per_256:
            size = 1 + (v >> 9) % self.max_slot
            return True, size, (v >> 3) % BUF_SIZE
        limit = 64 if v & 0x100 else self.max_inline
        return False, 1 + (v >> 9) % limit, (v >> 3) % BUF_SIZE

    def payload(self, i: int, size: int, off: int) -> bytes:
        seq = i & 0xFFFFFFFF
        if size < 8:
            return HDR.pack(seq, zlib.crc32(b"", seq))[:size]
        body = self.buf[off : off + size - 8]
        return HDR.pack(seq, zlib.crc32(body, seq)) + body

    def check(self, i: int, size: int, off: int, payload) -> str | None:
        """None if `payload` is frame i's payload, else what is wrong with it."""
        if len(payload) != size:
            return f"frame {i}: payload is {len(payload)} bytes, expected {size}"
        if size < 8:
            if bytes(payload) != self.payload(i, size, off):
                return f"frame {i}: short payload {bytes(payload).hex()} != {self.payload(i, size, off).hex()}"
            return None
        seq, crc = HDR.unpack_from(payload)
        if seq != i & 0xFFFFFFFF:
            return f"frame {i}: carries sequence number {seq} (lost, duplicated or reordered frame)"
        if zlib.crc32(memoryview(payload)[8:], seq) != crc:
            return f"frame {i} (seq {seq}, {size} bytes): checksum mismatch, content corrupted"
        return None


def walk_pool(pool) -> list[dict]:
    """Check that every class of `pool` is full and its free list intact; return per-class facts.

    Raises AssertionError naming the first violation: counts != (slot_count, 0), a slot not Free
    or still owned, a free-list index out of range, a slot listed twice (cycle), or a slot missing.
    """
    out = []
    for c in range(pool.num_classes):
        size, count = pool.class_info(c)
        counts = pool.counts(c)
        assert counts == (count, 0), f"class {c}: (free, allocated) = {counts}, expected ({count}, 0)"
        tag, idx = pool.free_head(c)
        seen: list[int] = []
        seen_set: set[int] = set()
        gen_sum = 0
        while idx != EMPTY_INDEX:
            assert idx < count, f"class {c}: free list reaches index {idx} >= slot_count {count} after {seen}"
            assert idx not in seen_set, f"class {c}: slot {idx} is on the free list twice (after {seen})"
            seen.append(idx)
            seen_set.add(idx)
            gen, state, owner, nxt = pool.slot_meta(c, idx)
            assert state == 0, f"class {c}: slot {idx} is on the free list but in state {state}"
            assert owner == 0, f"class {c}: free slot {idx} still has owner {owner}"
            gen_sum += gen
            idx = nxt
        assert sorted(seen) == list(range(count)), f"class {c}: free list holds {sorted(seen)}, expected all of 0..{count - 1}"
        out.append({"class": c, "slot_size": size, "slot_count": count, "tag": tag, "generation_sum": gen_sum})
    return out


# -- child processes ---------------------------------------------------------------------------


def spawn(script: str, args, pass_fds=(), stdin=None) -> subprocess.Popen:
    """Start tests/stress/<script> with this interpreter; stdout and stderr piped."""
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, script), *map(str, args)],
        pass_fds=tuple(pass_fds),
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def reap(proc: subprocess.Popen, timeout: float = 10.0) -> tuple[str, str]:
    """Kill `proc` if it still runs, wait for it and close its pipes; return (stdout, stderr).
    Idempotent: a second call returns the same output. (Children print little, so reading the
    pipes after the exit cannot block; a child stuck on a full pipe is killed by the timeout.)"""
    done = getattr(proc, "_stress_output", None)
    if done is not None:
        return done
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    out = {}
    for name in ("stdin", "stdout", "stderr"):
        f = getattr(proc, name)
        if f is None:
            continue
        try:
            if name != "stdin" and not f.closed:
                out[name] = f.read().decode(errors="replace")
        finally:
            try:
                f.close()
            except OSError:  # stdin: the flush of unsent bytes to a dead child
                pass
    proc._stress_output = (out.get("stdout", ""), out.get("stderr", ""))
    return proc._stress_output


@contextlib.contextmanager
def children(*procs_or_none):
    """Collect Popen objects in a list; on exit every one is killed if alive, waited and closed."""
    procs: list[subprocess.Popen] = list(p for p in procs_or_none if p is not None)
    try:
        yield procs
    finally:
        for p in procs:
            reap(p)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of proc's stdout, waiting at most `timeout` seconds (fails on EOF or timeout)."""
    import selectors

    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"child {proc.pid} printed no line within {timeout} s (got {buf!r})")
            chunk = os.read(fd, 1)
            if not chunk:
                raise AssertionError(f"child {proc.pid} closed stdout (exit {proc.poll()}) after {buf!r}")
            buf += chunk
    return buf.decode()


class Watchdog:
    """For children: exit at once if the parent died or the deadline passed (no orphan spins)."""

    def __init__(self, seconds: float) -> None:
        self.ppid = os.getppid()
        self.deadline = time.monotonic() + seconds

    def check(self, what: str) -> None:
        if os.getppid() != self.ppid:
            sys.stderr.write(f"parent died while {what}\n")
            os._exit(3)
        if time.monotonic() > self.deadline:
            sys.stderr.write(f"deadline passed while {what}\n")
            os._exit(4)


def die_with_parent() -> None:
    """Linux: ask for SIGKILL when the parent dies (PR_SET_PDEATHSIG), best effort."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except Exception:  # pragma: no cover - the Watchdog still covers this
        pass
