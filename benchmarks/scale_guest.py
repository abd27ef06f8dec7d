"""The many-guest scenarios' wire and guest side (issue 12): `python -m benchmarks.scale_guest IDX SEED`
runs one shmhub guest; the multiprocessing baselines run the same loops in forked children.

Every payload starts with a 16-byte header (kind, guest index, sequence number) and ends with the
sequence number's low byte; its size comes from a seeded table per guest and direction, half of it
in the inline tier (16-256 B) and half in the slot tier (1-16 KiB). The receiver checks the header,
the length and the last byte of every message."""

from __future__ import annotations

import json
import random
import struct
import sys
import time

HDR = struct.Struct("<BBHIQ")  # kind, 0, guest index, 0, seq
DATA, REPORT, HELLO, CMD, END = 1, 2, 3, 4, 5
TABLE = 1024  # sizes repeat with this period
INLINE = (HDR.size + 1, 256)  # the last byte is never inside the header
SLOT = (1024, 16384)
LAT_SAMPLES = 1000  # latencies a request/response guest reports (a reservoir sample)
CHECK_EVERY = 16  # a sender looks at the clock every this many messages


def size_table(seed: int, idx: int, direction: str) -> list:
    """TABLE payload sizes of guest `idx` in one direction ("up" to the host, "down" to the guest)."""
    rng = random.Random(f"shmhub-bench-scale/{seed}/{idx}/{direction}")  # str seeds: the same in every process
    return [rng.randint(*INLINE) if rng.random() < 0.5 else rng.randint(*SLOT) for _ in range(TABLE)]


class Payloads:
    """Writes message `seq` of guest `idx` into one buffer; views() gives it by table position."""

    def __init__(self, sizes: list) -> None:
        self.sizes = sizes
        self.buf = bytearray(max(sizes))
        mv = memoryview(self.buf)
        self.views = [mv[:n] for n in sizes]

    def get(self, kind: int, idx: int, seq: int):
        k = seq % TABLE
        n = self.sizes[k]
        HDR.pack_into(self.buf, 0, kind, 0, idx, 0, seq)
        self.buf[n - 1] = seq & 0xFF
        return self.views[k]


def check(data, idx: int, seq: int, sizes: list) -> bool:
    """Is `data` data message `seq` of guest `idx`, of the right length and last byte?"""
    with memoryview(data) as mv:  # released at once: a Message refuses release() under a live view
        n = len(mv)
        if n != sizes[seq % TABLE] or n < HDR.size:
            return False
        kind, _, i, _, s = HDR.unpack_from(mv)
        return kind == DATA and i == idx and s == seq and mv[n - 1] == seq & 0xFF


def drop(m) -> None:
    """Give a received message back now: a shmhub Message frees its slot (one the collector frees
    costs a ResourceWarning, as an unclosed file does); bytes need nothing."""
    release = getattr(m, "release", None)
    if release is not None:
        release()


def message(kind: int, idx: int, body: dict | None = None) -> bytes:
    return HDR.pack(kind, 0, idx, 0, 0) + (json.dumps(body).encode() if body is not None else b"")


def body(data) -> dict:
    return json.loads(bytes(memoryview(data)[HDR.size :]))


def kind_of(data) -> int:
    with memoryview(data) as mv:
        return mv[0] if len(mv) else 0


class Reservoir:
    """A uniform sample of at most LAT_SAMPLES values (seeded)."""

    def __init__(self, seed) -> None:
        self.rng = random.Random(seed)
        self.items: list = []
        self.n = 0

    def add(self, v) -> None:
        self.n += 1
        if len(self.items) < LAT_SAMPLES:
            self.items.append(v)
        else:
            j = self.rng.randrange(self.n)
            if j < LAT_SAMPLES:
                self.items[j] = v


# -- the guest loops, over any transport with send(bytes-like) and recv() -> bytes-like ------------


def wait_start(start: float) -> None:
    """Every sender starts at the same moment, however late its command came (the command of a
    phase goes to G guests one after another; waking each takes a while when G > cores)."""
    d = start - time.monotonic()
    if d > 0:
        time.sleep(d)


def fanin_guest(send, idx: int, seed: int, start: float, until: float) -> dict:
    p = Payloads(size_table(seed, idx, "up"))
    clock = time.monotonic
    wait_start(start)
    seq = 0
    while True:
        if seq % CHECK_EVERY == 0 and clock() >= until:
            break
        send(p.get(DATA, idx, seq))
        seq += 1
    return {"sent": seq}


def fanout_guest(recv, idx: int, seed: int) -> dict:
    sizes = size_table(seed, idx, "down")
    seen = errors = 0
    while True:
        m = recv()
        if kind_of(m) == END:
            return {"seen": seen, "errors": errors}
        if not check(m, idx, seen, sizes):
            errors += 1
        seen += 1
        drop(m)  # a zero-copy message goes back before the next wait


def reqresp_guest(send, recv, idx: int, seed: int, start: float, until: float) -> dict:
    p = Payloads(size_table(seed, idx, "up"))
    sizes = p.sizes
    res = Reservoir(f"{seed}/{idx}")
    now = time.perf_counter_ns
    clock = time.monotonic
    wait_start(start)
    rounds = errors = 0
    while clock() < until:
        t0 = now()
        send(p.get(DATA, idx, rounds))
        m = recv()
        t1 = now()
        if not check(m, idx, rounds, sizes):  # the host echoes every request
            errors += 1
        drop(m)
        res.add(t1 - t0)
        rounds += 1
    return {"rounds": rounds, "errors": errors, "lat_ns": res.items}


def command_loop(send, recv, idx: int, seed: int) -> None:
    """Say hello, then run the host's commands until an "exit" (the caller ends on the transport's
    end-of-stream: HostGone, EOFError)."""
    send(message(HELLO, idx))
    while True:
        m = recv()
        cmd = body(m)
        drop(m)
        op = cmd["op"]
        if op == "fanin":
            out = fanin_guest(send, idx, seed, cmd["start"], cmd["until"])
        elif op == "fanout":
            out = fanout_guest(recv, idx, seed)
        elif op == "reqresp":
            out = reqresp_guest(send, recv, idx, seed, cmd["start"], cmd["until"])
        elif op == "exit":
            return
        else:
            raise SystemExit(f"scale guest {idx}: unknown command {cmd}")
        send(message(REPORT, idx, out))


def main(idx: int | None = None, seed: int | None = None, cpus: list | None = None) -> None:
    """The guest: from the command line (host.spawn) or as a start_process target. cpus: the
    host's cores (a forkserver child inherits the forkserver's affinity, pinned or not)."""
    import os

    import shmhub

    if idx is None or seed is None:
        idx, seed = int(sys.argv[1]), int(sys.argv[2])
    if cpus:
        os.sched_setaffinity(0, cpus)
    link = shmhub.connect()
    try:
        command_loop(link.send, link.recv, idx, seed)
    except shmhub.HostGone:
        pass
    finally:
        link.close()


if __name__ == "__main__":
    main()
