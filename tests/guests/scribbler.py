"""A hostile guest for tests/stress/test_hostile.py: sends traffic, then writes seeded random
bytes over shared structures of its choosing, while traffic flows.

argv: SEED TARGET
  TARGET  g2h | h2g     its own rings (header or data bytes)
          peer          its own peer-table entry
          pool          the slot pool's metadata (class headers, free-list heads, slot headers)
          header        the segment header

Everything is a function of SEED: the message sizes (inline and slot payloads), after how many
messages it scribbles, how many writes, where and what, how many messages it sends after, and
whether it then keeps sending or just sleeps. It prints "scribbled OFFSET:HEX ..." once it has
written, then "done", then sleeps until killed (at most SLEEP s). A thread receives what the host
sends it. Errors after the scribble are expected (it broke its own link): it stops sending then.
"""

import os
import random
import sys
import threading
import time

import shmhub
from shmhub import layout as L
from shmhub.errors import ShmhubError

TIMEOUT = 1.0  # every send and receive here is bounded
SLEEP = 30.0


def target_ranges(link, target: str):
    """(offset, size) byte ranges the target covers."""
    seg, pid = link.segment, link.peer_id
    lay = seg.layout
    if target in ("g2h", "h2g"):
        off = lay.g2h_offset(pid) if target == "g2h" else lay.h2g_offset(pid)
        return [(off, L.RING_HEADER_SIZE), (off + L.RING_HEADER_SIZE, lay.bipbuf_capacity)]
    if target == "peer":
        return [(lay.peer_entry_offset(pid), L.PEER_ENTRY_SIZE)]
    if target == "pool":
        # class headers (sizes, free-list heads, extents, waiters) and each class's slot headers
        out = [(lay.var_pool_offset, L.CLASS_HEADER_SIZE * len(lay.classes))]
        out += [(c.meta_offset, L.SLOT_META_SIZE * c.slot_count) for c in lay.classes]
        return out
    if target == "header":
        return [(0, L.HEADER_SIZE)]
    raise SystemExit(f"unknown target {target!r}")


def aimed_ranges(link, target: str):
    """Where a write is likely to be read soon: the last bytes committed to its G2H ring (not yet
    received, with luck), or the headers of slots it owns (in flight to the host)."""
    seg, pid, region = link.segment, link.peer_id, link.segment.region
    lay = seg.layout
    if target == "g2h":
        off = lay.g2h_offset(pid)
        w = region.load_u32(off + L.RING_WRITE)
        if 0 < w <= lay.bipbuf_capacity:
            return [(off + L.RING_HEADER_SIZE + max(0, w - 32), min(w, 32))]
    if target == "pool":
        out = []
        for c in lay.classes:
            for s in range(c.slot_count):
                m = c.meta_offset + s * L.SLOT_META_SIZE
                if region.load_u32(m + L.META_STATE) == L.SLOT_ALLOCATED and region.load_u32(m + L.META_OWNER) == pid:
                    out.append((m, L.SLOT_META_SIZE))
        return out
    return []


def scribble(link, rng: random.Random, target: str) -> str:
    """1-4 writes in the target, half of them aimed (aimed_ranges): random bytes (1-8), or a
    plausible u32 (small, an index, all ones) at an aligned offset, which passes more checks."""
    ranges = (rng.random() < 0.5 and aimed_ranges(link, target)) or target_ranges(link, target)
    region = link.segment.region
    done = []
    for _ in range(rng.randint(1, 4)):
        base, size = rng.choice(ranges)
        if rng.random() < 0.5:
            n = rng.randint(1, min(8, size))
            data = rng.randbytes(n)
            off = base + rng.randrange(size - n + 1)
        else:
            value = rng.choice([0, 1, 2, 3, rng.randrange(64), rng.randrange(1 << 16), L.EMPTY_INDEX, rng.getrandbits(32)])
            data = value.to_bytes(4, "little")
            off = base + 4 * rng.randrange(max(1, size // 4))
        region.write(off, data)
        done.append(f"{off}:{data.hex()}")
    return " ".join(done)


def main() -> None:
    seed, target = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(seed)
    link = shmhub.connect()
    inline_max = link.segment.inline_threshold
    slot_max = link.segment.config.max_slot_payload
    before, after = rng.randrange(0, 150), rng.randrange(0, 100)
    keep_sending = rng.random() < 0.7
    stop = threading.Event()

    def receive() -> None:
        while not stop.is_set():
            try:
                link.recv(timeout=TIMEOUT).release()
            except shmhub.ShmTimeout:
                continue
            except ShmhubError:
                return  # corrupted, gone: what it did to itself

    threading.Thread(target=receive, daemon=True).start()

    def send(i: int) -> bool:
        n = rng.randint(inline_max + 1, slot_max) if rng.random() < 0.3 else rng.randint(1, inline_max)
        try:
            link.send(i.to_bytes(4, "little") * (n // 4) + b"x" * (n % 4), timeout=TIMEOUT)
            return True
        except ShmhubError:
            return False

    ok = all(send(i) for i in range(before))
    print("scribbled", scribble(link, rng, target), flush=True)
    if ok and keep_sending:
        all(send(before + i) for i in range(after))
    print("done", flush=True)
    time.sleep(SLEEP)  # until the test kills it: a hostile guest does not say goodbye
    stop.set()
    os._exit(0)


if __name__ == "__main__":
    main()
