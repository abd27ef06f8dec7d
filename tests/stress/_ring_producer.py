"""Producer child of test_ring_stress: streams a PayloadPlan through the G2H ring of its peer.

argv: segment_fd peer_id n_frames seed slot_per_256 [mode]
mode: "ok" (default); "corrupt:K" flips one payload byte of frame K after its checksum was
computed; "die:K" exits with status 7 right after committing frame K-1 (a crashed producer);
"hang:K" stops (sleeps, alive) after committing frame K-1 (a stuck producer).
Prints one line of JSON stats on success; exit status 0 = all frames committed.
"""

import json
import os
import sys
import time

from _stressutil import SPINS, backoff, PayloadPlan, Watchdog, die_with_parent

from shmhub import Segment
from shmhub._native import cpu_relax


def main() -> int:
    die_with_parent()
    fd, peer, n, seed, slot_per_256 = (int(a) for a in sys.argv[1:6])
    mode = sys.argv[6] if len(sys.argv) > 6 else "ok"
    corrupt_at = int(mode.split(":")[1]) if mode.startswith("corrupt:") else -1
    die_at = int(mode.split(":")[1]) if mode.startswith("die:") else -1
    hang_at = int(mode.split(":")[1]) if mode.startswith("hang:") else -1
    dog = Watchdog(300)
    seg = Segment.attach(fd)
    seg.peers.claim(peer)
    ring, pool = seg.g2h(peer), seg.pool
    # Everything is read back from the segment (trap 12): inline limit and largest slot payload.
    max_slot = max(pool.class_info(c)[0] for c in range(pool.num_classes)) - 4
    plan = PayloadPlan(n, seed, seg.inline_threshold, max_slot, slot_per_256)
    ring_full = pool_empty = 0
    per_class = [0] * pool.num_classes
    params, payload = plan.params, plan.payload
    write_inline, write_slot_ref, alloc = ring.write_inline, ring.write_slot_ref, pool.alloc
    for i in range(n):
        if i == die_at:
            os._exit(7)
        if i == hang_at:
            while True:  # the test kills us; the watchdog ends this if it does not
                time.sleep(0.1)
                dog.check("hanging on purpose")
        is_slot, size, off = params(i)
        data = payload(i, size, off)
        if i == corrupt_at:
            data = data[:-1] + bytes([data[-1] ^ 0x40])
        if is_slot:
            ref = alloc(size + 4, peer)
            spins = 0
            while ref is None:  # exhaustion is backpressure: the consumer frees
                pool_empty += 1
                spins += 1
                if not pool_empty & 0xFFFF:
                    dog.check(f"waiting for a slot for frame {i}")
                cpu_relax()
                if spins > SPINS:
                    backoff(spins)
                ref = alloc(size + 4, peer)
            c, e, s, gen = ref
            per_class[c] += 1
            pool.write_payload(c, s, data)
            spins = 0
            while not write_slot_ref(c, e, s, gen):
                ring_full += 1
                spins += 1
                if not ring_full & 0xFFFF:
                    dog.check(f"waiting for ring space for frame {i}")
                cpu_relax()
                if spins > SPINS:
                    backoff(spins)
        else:
            spins = 0
            while not write_inline(data):
                ring_full += 1
                spins += 1
                if not ring_full & 0xFFFF:
                    dog.check(f"waiting for ring space for frame {i}")
                cpu_relax()
                if spins > SPINS:
                    backoff(spins)
    print(json.dumps({"sent": n, "ring_full": ring_full, "pool_empty": pool_empty, "per_class": per_class}), flush=True)
    seg.peers.detach(peer)
    seg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
