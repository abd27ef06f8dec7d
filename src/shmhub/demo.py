"""`make demo`: a segment shared by two processes, a ring and the slot pool exercised across them."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib

from ._native import cpu_relax
from .cli import _print_text, inspect_segment
from .layout import SegmentConfig
from .segment import Segment

COUNT = 200_000

CHILD = r"""
import os, sys, zlib
from shmhub import Segment
from shmhub._native import cpu_relax
seg = Segment.attach(int(sys.argv[1]))
pid = seg.peers.attach()
ring, pool = seg.g2h(pid), seg.pool
for i in range(int(sys.argv[2])):
    n = i % 200
    if i % 10 == 0:   # every tenth message by reference to a slot (owner = this guest)
        while (ref := pool.alloc(n + 4, pid)) is None:
            cpu_relax()
        pool.write_payload(ref[0], ref[1], bytes([i & 0xFF]) * n)
        while not ring.write_slot_ref(ref[0], 0, ref[1], ref[2]):
            cpu_relax()
    else:
        payload = i.to_bytes(4, "little") + bytes(n)
        while not ring.write_inline(payload):
            cpu_relax()
while ring.indices[0] != ring.indices[2]:
    cpu_relax()
seg.peers.detach(pid)
seg.close()
"""


def main() -> int:
    cfg = SegmentConfig(max_guests=2, bipbuf_capacity=4096, size_classes=((256, 64), (4096, 8)))
    with Segment.create(cfg) as seg:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(seg.fd), str(COUNT)], pass_fds=(seg.fd,))
        t0 = time.perf_counter()
        ring, pool = seg.g2h(1), seg.pool
        got = inline = slots = 0
        while got < COUNT:
            frame = ring.read_frame()
            if frame is None:
                if child.poll() is not None:
                    raise SystemExit(f"producer exited with {child.returncode} after {got} messages")
                cpu_relax()
                continue
            n = got % 200
            if frame[0] == 1:  # slot ref: take ownership, check, free
                _, total, c, e, s, gen = frame
                length = pool.take(c, e, s, gen, 0)
                assert length == n and pool.read_payload(c, s) == bytes([got & 0xFF]) * n
                pool.free(c, e, s, gen)
                slots += 1
            else:
                _, total, payload = frame
                assert int.from_bytes(payload[:4], "little") == got and len(payload) == n + 4
                inline += 1
            ring.release(total)
            got += 1
        elapsed = time.perf_counter() - t0
        child.wait(timeout=30)
        print(f"{COUNT} messages from pid {child.pid} in {elapsed:.3f} s ({COUNT / elapsed / 1e6:.2f} M msg/s): "
              f"{inline} inline, {slots} by slot reference, all verified\n")
        _print_text(inspect_segment(seg), sys.stdout)
    return 0
