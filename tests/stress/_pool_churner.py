"""Churner child of test_pool_stress: alloc/free pairs on the segment's shared slot pool.

argv: segment_fd n_pairs seed max_hold stop_on_failure
Attaches as a walk-in peer, prints "ready <peer_id>", waits for a line on stdin, then runs until
it has freed n_pairs slots. Each round it allocates 1..max_hold slots (stopping early when the
pool is exhausted), stamps each with (pid, peer_id, counter) via write_payload, lets a few cycles
pass, then in random order checks that every stamp and slot meta (generation, Allocated, owner)
is still its own and frees the slot. A slot handed out twice shows up as a foreign stamp, a moved
generation or a failing free. Prints one JSON line; exit status 1 if anything was wrong.
"""

import json
import os
import random
import struct
import sys
import time

from _stressutil import SPINS, backoff, Watchdog, die_with_parent

from shmhub import Segment, ShmhubError
from shmhub._native import cpu_relax

STAMP = struct.Struct("<IIQ")  # pid, peer_id, counter
ALLOCATED = 1


def main() -> int:
    die_with_parent()
    fd, n, seed, max_hold, stop_on_failure = (int(a) for a in sys.argv[1:6])
    dog = Watchdog(300)
    seg = Segment.attach(fd)
    pool = seg.pool
    peer = seg.peers.attach()
    pid = os.getpid()
    rng = random.Random(seed)
    nclasses = pool.num_classes
    max_size = max(pool.class_info(c)[0] for c in range(nclasses))
    filler = rng.randbytes(max_size)
    print(f"ready {peer}", flush=True)
    if not sys.stdin.readline():
        return 3  # parent gone
    failures: list[str] = []
    n_failures = pairs = exhausted = counter = idle = 0
    per_class = [0] * nclasses
    held: list[tuple] = []
    t_start = time.monotonic()

    def fail(msg: str) -> None:
        nonlocal n_failures
        n_failures += 1
        if len(failures) < 10:
            failures.append(msg)

    while pairs < n and not (stop_on_failure and n_failures):
        want = 1 if max_hold == 1 else rng.randint(1, max_hold)
        while len(held) < want:
            size = rng.randint(STAMP.size + 4, max_size)  # bytes needed: [u32 len][payload]
            if rng.random() < 0.125:  # sometimes a class of our choosing, if it is big enough
                c = rng.randrange(nclasses)
                ref = pool.alloc_in_class(c, peer) if pool.class_info(c)[0] >= size else pool.alloc(size, peer)
            else:
                ref = pool.alloc(size, peer)
            if ref is None:
                exhausted += 1
                break
            c, e, s, gen = ref
            per_class[c] += 1
            meta = pool.slot_meta(c, s)
            if meta[:3] != (gen, ALLOCATED, peer):
                fail(f"fresh slot {c}/{s} gen {gen}: meta (gen, state, owner, next) = {meta}")
            data = STAMP.pack(pid, peer, counter) + filler[: size - 4 - STAMP.size]
            counter += 1
            pool.write_payload(c, s, data)
            held.append((c, e, s, gen, data))
        if not held:
            idle += 1
            if not idle & 0xFFFF:
                dog.check("waiting for a free slot")
            cpu_relax()
            if idle > SPINS:
                backoff(idle)
            continue
        idle = 0
        for _ in range(rng.randrange(16)):  # give the other churner a chance to collide
            cpu_relax()
        if max_hold > 1:
            rng.shuffle(held)
        for c, e, s, gen, data in held:
            got = pool.read_payload(c, s)
            meta = pool.slot_meta(c, s)
            if got != data:
                who = STAMP.unpack_from(got) if len(got) >= STAMP.size else got
                fail(f"slot {c}/{s} gen {gen}: my stamp {STAMP.unpack_from(data)} was overwritten by {who}")
            if meta[:3] != (gen, ALLOCATED, peer):
                fail(f"slot {c}/{s} gen {gen}: held slot's meta changed to {meta}")
            try:
                pool.free(c, e, s, gen)
            except ShmhubError as err:
                fail(f"free of slot {c}/{s} gen {gen}: {type(err).__name__}: {err}")
            pairs += 1
        held.clear()
        if not pairs & 0x3FFF:
            dog.check("churning")
    t_end = time.monotonic()
    print(
        json.dumps(
            {
                "peer": peer,
                "pid": pid,
                "pairs": pairs,
                "exhausted": exhausted,
                "per_class": per_class,
                "n_failures": n_failures,
                "failures": failures,
                "t_start": t_start,
                "t_end": t_end,
            }
        ),
        flush=True,
    )
    seg.peers.detach(peer)
    seg.close()
    return 1 if n_failures else 0


if __name__ == "__main__":
    sys.exit(main())
