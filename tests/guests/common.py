"""Helpers shared by the guest programs and the link tests: deterministic payloads and sizes."""

from __future__ import annotations

import os
import random
import resource
import struct

SEQ = struct.Struct("<I")


def payload(seed: int, seq: int, n: int) -> bytes:
    """n seeded random bytes, distinct for every (seed, seq)."""
    return random.Random(seed * 1_000_003 + seq).randbytes(n)


class Stream:
    """Message `seq` of a stream: a seeded size, a 4-byte sequence number, then bytes of a seeded
    blob at a seq-dependent offset. Sizes run from 4 to inline_max, except about one message in
    `slot_every` (0: none), sized above inline_max up to slot_max. Cheap enough for 10^5 messages
    per second in Python."""

    def __init__(self, seed: int, count: int, inline_max: int, slot_max: int, slot_every: int = 50) -> None:
        rng = random.Random(seed)
        self.blob = rng.randbytes(2 * max(slot_max, inline_max) + 4096)
        self.sizes = [
            rng.randint(inline_max + 1, slot_max) if slot_every and rng.randrange(slot_every) == 0 else rng.randint(SEQ.size, inline_max) for _ in range(count)
        ]
        self.count = count

    def message(self, seq: int) -> bytes:
        n = self.sizes[seq]
        off = (seq * 7919) % 4096
        return SEQ.pack(seq) + self.blob[off : off + n - SEQ.size]

    def check(self, expected_seq: int, data) -> str | None:
        """None if `data` is message expected_seq, else what is wrong with it."""
        with memoryview(data) as mv:  # released even if this raises: a Message refuses release() under a live view
            if len(mv) < SEQ.size:
                return f"message of {len(mv)} bytes has no sequence number (expected seq {expected_seq})"
            (seq,) = SEQ.unpack_from(mv)
            if seq != expected_seq:
                return f"got seq {seq}, expected {expected_seq} (lost, duplicated or reordered)"
            if seq >= self.count:
                return f"seq {seq} is beyond the stream's {self.count} messages"
            if mv != self.message(seq):
                return f"seq {seq}: content or size wrong (got {len(mv)} bytes, expected {self.sizes[seq]})"
            return None


def gil_progress(fn) -> tuple:
    """Run fn() while a second Python thread counts in a loop: (count per second, elapsed s,
    fn's exception or None). Compare with gil_progress(lambda: time.sleep(t))."""
    import threading
    import time

    box = [0, False]
    ready = threading.Event()

    def count():
        n = 0
        ready.set()
        while not box[1]:
            n += 1
        box[0] = n

    th = threading.Thread(target=count, name="gil-counter")
    th.start()
    ready.wait()
    err = None
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as e:  # returned to the caller
        err = e
    elapsed = time.monotonic() - t0
    box[1] = True
    th.join()
    return box[0] / elapsed, elapsed, err


def gil_ratio(wait, t: float, rounds: int = 3) -> tuple:
    """How fast a counting thread runs while `wait(t)` blocks, relative to while the main thread
    is in time.sleep(t): measured in `rounds` interleaved pairs (other load on the machine
    shifts both alike). Returns (ratio, [(elapsed, exception) of each wait])."""
    import time

    base = meas = base_s = meas_s = 0.0
    waits = []
    for _ in range(rounds):
        rate, el, _ = gil_progress(lambda: time.sleep(t))
        base, base_s = base + rate * el, base_s + el
        rate, el, err = gil_progress(lambda: wait(t))
        meas, meas_s = meas + rate * el, meas_s + el
        waits.append((el, err))
    return (meas / meas_s) / (base / base_s), waits


def leave_free(n: int) -> tuple:
    """Lower this process's RLIMIT_NOFILE so that exactly n more fds can be opened (the kernel
    takes the lowest free numbers); returns the old limits, for setrlimit to restore."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = set()
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            os.fstat(fd)  # listdir's own fd is listed, and closed again
            used.add(fd)
        except OSError:
            pass
    limit = free = 0
    while free < n or limit in used:
        free += limit not in used
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, old[1]))
    return old
