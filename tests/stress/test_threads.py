"""In-process threaded stress of the core: a ring with its producer and consumer in two threads
(the GIL-free spin loops run concurrently with the other side), the slot pool popped and freed
by several threads, and a host link and a guest link in one process with several sender and
receiver threads per side. `make tsan` runs these under ThreadSanitizer (docs/hardening.md);
the cross-process stress tests (test_ring_stress.py, test_pool_stress.py) cover what TSan
cannot see: the other side of a mapping in another process.

Every wait has a deadline; every thread is joined with a timeout and its exception re-raised.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
import time
import zlib

import pytest
from _stressutil import walk_pool

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub._native import Region, Ring
from shmhub.doorbell import Doorbell
from shmhub.link import GUEST, HOST, Link

pytestmark = pytest.mark.timeout(180)
SCALE = float(os.environ.get("SHMHUB_THREAD_STRESS_SCALE", "1"))
JOIN_S = 120


def _run(threads: list) -> None:
    errors: list = []

    def wrap(fn, *args):
        def body():
            try:
                fn(*args)
            except BaseException as e:  # re-raised in the main thread
                errors.append(e)

        return body

    ts = [threading.Thread(target=wrap(fn, *args), daemon=True) for fn, *args in threads]
    for t in ts:
        t.start()
    for t in ts:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in ts), "a stress thread is still running after its deadline"
    if errors:
        raise errors[0]


def _payload(tag: int, seq: int, size: int) -> bytes:
    head = struct.pack("<II", tag, seq)
    body = (head * (size // 8 + 1))[: max(0, size - 12)]
    return head + body + struct.pack("<I", zlib.crc32(head + body))


def _check(data: bytes) -> tuple:
    tag, seq = struct.unpack_from("<II", data)
    assert zlib.crc32(data[:-4]) == struct.unpack_from("<I", data, len(data) - 4)[0], f"corrupt payload {tag}/{seq}"
    return tag, seq


def test_ring_spsc_two_threads():
    """One producer thread, one consumer thread, a 512-byte ring: every frame arrives once, in
    order, intact, across many wraps."""
    n = int(4000 * SCALE)
    fd = os.memfd_create("shmhub-threads", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    region = Region(fd, 4096, True)
    try:
        region.store_u32(L.RING_CAPACITY, 512)
        tx, rx = Ring(region, 0), Ring(region, 0)
        rng = random.Random(0x7A11)
        sizes = [rng.choice((12, 16, 40, 100, 180)) for _ in range(n)]

        def produce():
            deadline = time.monotonic() + JOIN_S
            for i, size in enumerate(sizes):
                data = _payload(1, i, size)
                while tx.send_inline(data, False) < 0:  # -1: the ring is full
                    tx.spin_room(size + 8, 20_000)  # GIL released: races the consumer's index stores
                    assert time.monotonic() < deadline, f"producer stuck at frame {i}"

        def consume():
            deadline = time.monotonic() + JOIN_S
            for i, size in enumerate(sizes):
                while True:
                    data = rx.recv_inline()
                    if data is not None:
                        break
                    rx.spin_readable(20_000)
                    assert time.monotonic() < deadline, f"consumer stuck at frame {i}"
                assert len(data) == size and _check(data) == (1, i)

        old = sys.getswitchinterval()
        sys.setswitchinterval(1e-5)  # hand the GIL over at once: each side waits on the other
        try:
            _run([(produce,), (consume,)])
        finally:
            sys.setswitchinterval(old)
        assert rx.recv_inline() is None
    finally:
        region.close()
        os.close(fd)


def test_pool_threads_pop_and_free():
    """Four threads allocate and free slots of three classes at random; at the end every class is
    full and its free list intact (no slot lost, none listed twice)."""
    cfg = SegmentConfig(max_guests=4, bipbuf_capacity=256, size_classes=((64, 8), (256, 4), (1024, 2)))
    with Segment.create(cfg) as seg:
        pool = seg.pool
        rounds = int(4000 * SCALE)

        def churn(owner: int):
            rng = random.Random(owner)
            held = []
            for _ in range(rounds):
                if held and (len(held) > 3 or rng.random() < 0.5):
                    pool.free(*held.pop(rng.randrange(len(held)))[:4], by=owner)
                else:
                    ref = pool.alloc(rng.choice((10, 100, 600)), owner)
                    if ref is not None:
                        held.append(ref)
            for ref in held:
                pool.free(*ref[:4], by=owner)

        _run([(churn, owner) for owner in (1, 2, 3, 4)])
        walk_pool(pool)


def test_link_threads_both_sides():
    """A host link and a guest link in one process, two sender and two receiver threads on each
    side, inline and slot payloads: every message arrives once and intact, and each receiver sees
    each sender's messages in the order sent."""
    per_sender = int(1500 * SCALE)
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=2048, inline_threshold=64, size_classes=((256, 16), (2048, 8)))
    with Segment.create(cfg) as seg:
        pid = seg.peers.attach()
        bell, guest_sock = Doorbell.pair()
        guest_bell = Doorbell(guest_sock)
        host = Link(seg, pid, bell, HOST)
        guest = Link(seg, pid, guest_bell, GUEST)
        try:
            received = {HOST: [], GUEST: []}  # per side: (receiver, tag, seq) in arrival order
            lock = threading.Lock()
            total = 2 * per_sender

            def send(link: Link, tag: int):
                rng = random.Random(tag)
                for i in range(per_sender):
                    link.send(_payload(tag, i, rng.choice((16, 60, 200, 1500))), timeout=60)

            def recv(link: Link, side: str, me: int):
                out = received[side]
                while True:
                    with lock:
                        if len(out) >= total:
                            return
                    try:
                        msg = link.recv(timeout=0.05)
                    except TimeoutError:
                        continue
                    with msg:
                        tag, seq = _check(bytes(msg))
                    with lock:
                        out.append((me, tag, seq))

            _run(
                [
                    (send, host, 10),
                    (send, host, 11),
                    (send, guest, 20),
                    (send, guest, 21),
                    (recv, guest, GUEST, 0),
                    (recv, guest, GUEST, 1),
                    (recv, host, HOST, 0),
                    (recv, host, HOST, 1),
                ]
            )
            for side, tags in ((GUEST, (10, 11)), (HOST, (20, 21))):
                got = received[side]
                assert sorted((t, s) for _, t, s in got) == sorted((t, s) for t in tags for s in range(per_sender))
                for me in (0, 1):
                    for t in tags:
                        seqs = [s for r, tt, s in got if r == me and tt == t]
                        assert seqs == sorted(seqs), f"receiver {me} saw sender {t} out of order"
        finally:
            guest.close()
            host.close()
            guest_bell.close()
            bell.close()
        walk_pool(seg.pool)


_CANARY = """
import os, sys, threading
from shmhub._native import Region
fd = os.memfd_create("canary", os.MFD_CLOEXEC)
os.ftruncate(fd, 1 << 22)
r = Region(fd, 1 << 22, True)
big = b"x" * (1 << 21)  # a copy this large drops the GIL: two of them race on the same bytes
sys.setswitchinterval(1e-6)
ts = [threading.Thread(target=lambda: [r.write(0, big) for _ in range(50)]) for _ in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


@pytest.mark.skipif("libtsan" not in os.environ.get("LD_PRELOAD", ""), reason="make tsan only: checks TSan reports a race")
def test_tsan_reports_a_race_in_the_core():
    """Under `make tsan`: two threads copying into the same bytes without synchronisation are
    reported, so a clean run of the tests above means something."""
    import subprocess

    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    p = subprocess.run([sys.executable, "-c", _CANARY], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 66 and "WARNING: ThreadSanitizer: data race" in p.stderr, p.stderr[-2000:]
    assert "Region_32write" in p.stderr or "Region" in p.stderr
