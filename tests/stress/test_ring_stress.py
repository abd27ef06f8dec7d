"""Cross-process ring stress (algorithms.md 2.1, 2.3): a producer PROCESS streams seeded
variable-size frames through a small BipBuffer, inline and by slot reference; this process
consumes and verifies every frame's order, size and checksum, counts how often the ring wrapped,
and checks that the slot pool ends up full with intact free lists.

Both sides busy-poll with cpu_relax() (backing off to sched_yield/short sleeps only after 200
failed polls, see _stressutil.backoff). The consumer polls the child whenever the ring is empty,
so a dead producer fails the test instead of hanging it, and a live producer that stops sending
fails it after a stall timeout; every test also has a pytest timeout.
"""

from __future__ import annotations

import json
import time

import pytest
from _stressutil import SPINS, backoff, PayloadPlan, children, reap, spawn, walk_pool

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub._native import cpu_relax

SEED = 0x5EED_0007


class ProducerDied(AssertionError):
    def __init__(self, msg: str, got: int) -> None:
        super().__init__(msg)
        self.got = got


def consume(seg: Segment, peer: int, plan: PayloadPlan, proc, stall_timeout: float = 30.0) -> dict:
    """Read plan.n frames from peer's G2H ring, verifying each against the plan.

    Slot references: the slot must be Allocated under the frame's generation and owned by the
    producer's peer id; the consumer takes it (owner -> host), checks the payload, frees it.
    Returns counters; raises AssertionError on any mismatch, ProducerDied if the producer exits
    with frames missing, and AssertionError if no frame arrives for `stall_timeout` seconds while
    the producer lives (a hang). There is no limit on the total time (a loaded machine is slow,
    not wrong): the pytest timeout bounds that.
    """
    ring, pool = seg.g2h(peer), seg.pool
    read_frame, release, params, check = ring.read_frame, ring.release, plan.params, plan.check
    stall_since = time.monotonic()
    got = wraps = idle = total_bytes = 0
    prev_start = -1
    slot_per_class = [0] * pool.num_classes
    inline_sizes = [1 << 30, 0]
    n = plan.n
    while got < n:
        frame = read_frame()
        if frame is None:
            idle += 1
            if not idle & 0x3F:
                now = time.monotonic()
                if idle == 0x40:
                    stall_since = now
                if proc.poll() is not None:
                    frame = read_frame()  # it may have committed its last frames and exited
                    if frame is None:
                        err = proc.stderr.read().decode(errors="replace").strip()
                        raise ProducerDied(f"producer exited with status {proc.returncode} after {got} of {n} frames: {err}", got)
                elif now - stall_since > stall_timeout:
                    raise AssertionError(f"no frame {got} for {stall_timeout} s, producer alive: a hang (ring indices {ring.indices})")
            if frame is None:
                cpu_relax()
                if idle > SPINS:
                    backoff(idle)
                continue
        idle = 0
        # read_frame leaves `read` at the frame's start (resetting it to 0 when it consumed a
        # wrap): the start going backwards is one wrap of the ring.
        start = ring.indices[2]
        if start <= prev_start:
            wraps += 1
        prev_start = start
        is_slot, size, off = params(got)
        kind, total = frame[0], frame[1]
        if is_slot:
            assert kind == L.KIND_SLOT_REF, f"frame {got}: expected a slot reference, got {frame[:2]}"
            _, total, c, e, s, gen = frame
            assert total == L.SLOT_REF_FRAME_SIZE and e == 0, f"frame {got}: bad slot-ref frame {frame}"
            meta = pool.slot_meta(c, s)
            assert meta[:3] == (gen, L.SLOT_ALLOCATED, peer), f"frame {got}: slot {c}/{s} meta {meta}, expected gen {gen} Allocated owner {peer}"
            length = pool.take(c, e, s, gen, L.HOST_OWNER)
            assert length == size, f"frame {got}: slot length prefix {length}, expected {size}"
            err = check(got, size, off, pool.read_payload(c, s))
            pool.free(c, e, s, gen)
            slot_per_class[c] += 1
        else:
            assert kind == L.KIND_INLINE, f"frame {got}: expected an inline frame, got {frame[:2]}"
            assert total == (L.FRAME_HEADER_SIZE + size + 3) & ~3, f"frame {got}: total_len {total} for {size} bytes"
            err = check(got, size, off, frame[2])
            inline_sizes[0] = min(inline_sizes[0], size)
            inline_sizes[1] = max(inline_sizes[1], size)
        if err:
            raise AssertionError(err)
        release(total)
        total_bytes += total
        got += 1
    return {"got": got, "wraps": wraps, "bytes": total_bytes, "slot_per_class": slot_per_class, "min_inline": inline_sizes[0], "max_inline": inline_sizes[1]}


def run_stream(cfg: SegmentConfig, n: int, slot_per_256: int, seed: int = SEED):
    """Spawn a producer for n frames and consume them; returns (consumer stats, producer stats, seg facts)."""
    with Segment.create(cfg) as seg:
        peer = seg.peers.reserve()
        max_slot = max(size for size, _ in cfg.size_classes) - L.SLOT_LEN_PREFIX
        plan = PayloadPlan(n, seed, seg.inline_threshold, max_slot, slot_per_256)
        with children(spawn("_ring_producer.py", [seg.fd, peer, n, seed, slot_per_256], pass_fds=(seg.fd,))) as procs:
            t0 = time.perf_counter()
            stats = consume(seg, peer, plan, procs[0])
            stats["seconds"] = time.perf_counter() - t0
            procs[0].wait(timeout=30)
            out, err = reap(procs[0])
        assert procs[0].returncode == 0, f"producer failed ({procs[0].returncode}): {err}"
        prod = json.loads(out)
        ring = seg.g2h(peer)
        write, watermark, read = ring.indices
        facts = {
            "indices": (write, watermark, read),
            "next_frame": ring.read_frame(),
            "peer_state": seg.peers.state(peer),
            "pool": walk_pool(seg.pool),
            "inline_threshold": seg.inline_threshold,
        }
    return stats, prod, facts


def check_stream(cfg, n, stats, prod, facts):
    cap = cfg.bipbuf_capacity
    assert stats["got"] == prod["sent"] == n
    # Each lap of the ring carries at most `cap` bytes of frames, so the laps are at least
    # bytes / cap; the read offset went back to 0 once per lap after the first.
    assert stats["wraps"] >= 1000, stats
    assert stats["wraps"] >= -(-stats["bytes"] // cap) - 1, stats
    assert prod["ring_full"] > 0, f"the producer never found the ring full: no backpressure was exercised {prod}"
    # Inline payloads covered the whole range 1 .. effective inline threshold (entries up to cap/2).
    assert facts["inline_threshold"] == cap // 2 - L.FRAME_HEADER_SIZE
    assert (stats["min_inline"], stats["max_inline"]) == (1, facts["inline_threshold"]), stats
    # Drained: nothing left, no wrap pending, the producer said goodbye.
    write, watermark, read = facts["indices"]
    assert write == read and watermark == 0, facts["indices"]
    assert facts["next_frame"] is None
    assert facts["peer_state"] == L.PEER_GOODBYE
    # Slot references: the producer's per-class allocations are exactly what was received, and
    # the pool is full again with intact free lists (walk_pool). Every allocation bumped the
    # slot's generation once, every alloc and every free bumped the class's ABA tag once.
    assert prod["per_class"] == stats["slot_per_class"]
    assert all(k > 0 for k in stats["slot_per_class"]), stats["slot_per_class"]
    for cls, allocs in zip(facts["pool"], stats["slot_per_class"]):
        assert cls["generation_sum"] == allocs, (cls, allocs)
        assert cls["tag"] == (2 * allocs) & 0xFFFFFFFF, (cls, allocs)


@pytest.mark.timeout(240)
def test_million_frames_through_a_4k_ring_inline_and_slot_refs():
    """10^6 frames, 1..2040-byte inline payloads (cap/2 - 8, the effective inline threshold of a
    4096-byte ring) and 1/16 of them by slot reference (1..4092 bytes) from a 12-slot pool."""
    cfg = SegmentConfig(max_guests=2, bipbuf_capacity=4096, inline_threshold=L.MAX_INLINE_LEN, size_classes=((256, 8), (4096, 4)))
    n = 1_000_000
    stats, prod, facts = run_stream(cfg, n, slot_per_256=16)
    print(
        f"\n{n} frames in {stats['seconds']:.2f} s, {stats['wraps']} wraps, {stats['bytes']} ring bytes, "
        f"slot refs per class {stats['slot_per_class']}, producer stats {prod}"
    )
    check_stream(cfg, n, stats, prod, facts)


@pytest.mark.timeout(180)
def test_slot_heavy_stream_through_a_1k_ring():
    """Half of 300k frames by slot reference through a 1024-byte ring and a 6-slot pool: the
    producer keeps running out of slots (backpressure) while frames keep wrapping."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=1024, inline_threshold=L.MAX_INLINE_LEN, size_classes=((64, 4), (1024, 2)))
    n = 300_000
    stats, prod, facts = run_stream(cfg, n, slot_per_256=128, seed=SEED + 1)
    print(f"\n{n} frames in {stats['seconds']:.2f} s, {stats['wraps']} wraps, slot refs per class {stats['slot_per_class']}, producer stats {prod}")
    check_stream(cfg, n, stats, prod, facts)
    assert prod["pool_empty"] > 0, "the producer never ran out of slots"


@pytest.mark.timeout(60)
def test_consumer_detects_a_dead_producer():
    """A producer that dies after 5000 frames makes the consumer fail with its exit status,
    after exactly the frames it committed, instead of spinning forever."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=1024, inline_threshold=L.MAX_INLINE_LEN, size_classes=((64, 4), (1024, 2)))
    n, die_at = 50_000, 5_000
    with Segment.create(cfg) as seg:
        peer = seg.peers.reserve()
        plan = PayloadPlan(n, SEED, seg.inline_threshold, 1020, 64)
        with children(spawn("_ring_producer.py", [seg.fd, peer, n, SEED, 64, f"die:{die_at}"], pass_fds=(seg.fd,))) as procs:
            t0 = time.monotonic()
            with pytest.raises(ProducerDied, match="status 7 after 5000 of 50000") as info:
                consume(seg, peer, plan, procs[0])
            assert time.monotonic() - t0 < 20
        assert info.value.got == die_at
        # Every slot it committed was taken and freed by the consumer: nothing to reclaim.
        assert seg.pool.reclaim(peer) == 0
        walk_pool(seg.pool)


@pytest.mark.timeout(60)
def test_consumer_detects_a_stuck_producer():
    """A producer that stays alive but stops sending makes the consumer fail after its stall
    timeout, not hang."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=1024, inline_threshold=L.MAX_INLINE_LEN, size_classes=((64, 4), (1024, 2)))
    n = 50_000
    with Segment.create(cfg) as seg:
        peer = seg.peers.reserve()
        plan = PayloadPlan(n, SEED, seg.inline_threshold, 1020, 64)
        with children(spawn("_ring_producer.py", [seg.fd, peer, n, SEED, 64, "hang:3000"], pass_fds=(seg.fd,))) as procs:
            t0 = time.monotonic()
            with pytest.raises(AssertionError, match="no frame 3000 for 2.0 s, producer alive: a hang"):
                consume(seg, peer, plan, procs[0], stall_timeout=2.0)
            assert 2.0 <= time.monotonic() - t0 < 20
            assert procs[0].poll() is None  # it really was alive


@pytest.mark.timeout(60)
def test_consumer_detects_a_corrupted_payload():
    """The checksum catches one flipped byte: the verification is not vacuous."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=4096, inline_threshold=L.MAX_INLINE_LEN, size_classes=((256, 8), (4096, 4)))
    n, bad = 20_000, 12_345
    with Segment.create(cfg) as seg:
        peer = seg.peers.reserve()
        plan = PayloadPlan(n, SEED, seg.inline_threshold, 4092, 16)
        with children(spawn("_ring_producer.py", [seg.fd, peer, n, SEED, 16, f"corrupt:{bad}"], pass_fds=(seg.fd,))) as procs:
            with pytest.raises(AssertionError, match=f"frame {bad}\\b"):
                consume(seg, peer, plan, procs[0])


# -- the wrap-publication race, pinned deterministically ---------------------------------------
#
# A wrap is two Release stores by the producer: watermark = write, then write = 0
# (algorithms.md 2.1). A consumer that sees the new watermark may still load the OLD write, the
# pre-wrap end of data (== watermark): the producer can be preempted between its two stores. If
# the consumer then resets read and watermark to 0 and trusts that write, it re-reads [0, write):
# frames it already consumed (duplicates; stale slot references), while the producer is about to
# overwrite them. The stress runs above hit this under load ("frame 84182: total_len 272 for
# 1119 bytes" = frame 84179 delivered a second time). These tests put a ring into the exact state
# "watermark stored, write = 0 not yet stored" and check the consumer waits instead.


def _wrap_half_done(seg, ring):
    """Simulate the producer preempted after the first of its two wrap stores."""
    write, watermark, read = ring.indices
    assert watermark == 0 and write > 0
    seg.region.store_u32(ring.offset + L.RING_WATERMARK, write)


def _finish_wrap(seg, ring, payload: bytes) -> None:
    """The producer resumes: write = 0, then its granted front frame [0, n) and the commit."""
    from shmhub._native import encode_inline

    frame = encode_inline(payload)
    seg.region.store_u32(ring.offset + L.RING_WRITE, 0)
    ring.write_data(0, frame)
    ring.commit(len(frame))


def _wrap_race_ring():
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=256, size_classes=((64, 1),))
    seg = Segment.create(cfg)
    ring = seg.g2h(1)
    for k in range(3):  # 3 x 64 bytes: write = 192; the next 100-byte frame must wrap
        assert ring.write_inline(bytes([k]) * 56)
    return seg, ring


@pytest.mark.timeout(10)
def test_wrap_not_yet_published_is_not_read_by_read_frame():
    seg, ring = _wrap_race_ring()
    with seg:
        for k in range(3):
            frame = ring.read_frame()
            assert frame[2] == bytes([k]) * 56
            ring.release(frame[1])
        assert ring.indices == (192, 0, 192)  # all consumed, no wrap yet
        _wrap_half_done(seg, ring)  # producer: watermark = 192 ... preempted before write = 0
        stale = ring.read_frame()
        assert stale is None, f"consumer re-read an already consumed frame during a wrap: {stale[:2]} {stale[2][:8]!r}..."
        _finish_wrap(seg, ring, b"new" * 30)
        frame = ring.read_frame()
        assert frame is not None and frame[2] == b"new" * 30
        ring.release(frame[1])
        assert ring.read_frame() is None


@pytest.mark.timeout(10)
def test_wrap_not_yet_published_is_not_read_after_release():
    seg, ring = _wrap_race_ring()
    with seg:
        for _ in range(2):
            frame = ring.read_frame()
            ring.release(frame[1])
        last = ring.read_frame()
        assert last[2] == bytes([2]) * 56
        _wrap_half_done(seg, ring)  # watermark = 192 = the end of the frame being consumed
        ring.release(last[1])  # reaches the watermark while write still reads 192
        stale = ring.read_frame()
        assert stale is None, f"consumer re-read an already consumed frame during a wrap: {stale[:2]} {stale[2][:8]!r}..."
        _finish_wrap(seg, ring, b"new" * 30)
        frame = ring.read_frame()
        assert frame is not None and frame[2] == b"new" * 30
        ring.release(frame[1])
        assert ring.read_frame() is None
