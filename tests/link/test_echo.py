"""Echo between host and guest across every payload tier boundary, both directions, with
content checks; bytes-like inputs of every shape; Message zero-copy and release semantics."""

from __future__ import annotations

import gc
import json
import random
import threading

import numpy as np
import pytest

import shmhub
from shmhub import Host, SegmentConfig

from linkutil import allocated, allocated_slots, class_for, payload, spawn, wait_event, wait_until

CFG = SegmentConfig(max_guests=2, bipbuf_capacity=64 * 1024, max_payload_size=4 << 20, size_classes=((1024, 8), (16 * 1024, 8), (256 * 1024, 8), (1 << 20, 8)))
MAX = CFG.max_payload_size
INLINE = CFG.effective_inline_threshold
SLOT_PAYLOADS = [size - 4 for size, _ in CFG.size_classes]  # slot_size - u32 length prefix
LARGEST = CFG.max_slot_payload
NO_SLOTS = [0] * len(CFG.size_classes)


def _sizes(seed: int) -> list:
    """0 B to the largest slot payload: every tier boundary and +-1 around it, plus seeded
    random sizes inside each tier."""
    s = {0, 1, 2, 3, 4, 5, INLINE - 1, INLINE, INLINE + 1}
    for t in SLOT_PAYLOADS:
        s |= {t - 1, t, t + 1}
    s |= {LARGEST + 1, LARGEST + 4}  # largest slot_size - 3 and above: the mmap tier (test_mmap.py covers it at length)
    rng = random.Random(seed)
    lows = [0, INLINE] + SLOT_PAYLOADS[:-1]
    for lo, hi in zip(lows, [INLINE] + SLOT_PAYLOADS):
        s.add(rng.randint(lo + 1, hi))
    return sorted(s)


SIZES = _sizes(7)
TOO_LARGE = [MAX + 1, MAX + 4, MAX + 4096]


def test_size_list_covers_every_boundary():
    assert INLINE == 256 and LARGEST == (1 << 20) - 4
    for b in [0, INLINE, INLINE + 1, *SLOT_PAYLOADS]:
        assert b in SIZES
    assert max(SIZES) == LARGEST + 4 and LARGEST + 1 == CFG.size_classes[-1][0] - 3 and LARGEST in SIZES


def _tier(n: int) -> str:
    return "inline" if n <= INLINE else "slot" if n <= LARGEST else "mmap"


def _counts(sizes) -> tuple:
    """(inline, slot, mmap) messages among payloads of these sizes."""
    tiers = [_tier(n) for n in sizes]
    return tiers.count("inline"), tiers.count("slot"), tiers.count("mmap")


def test_host_sends_guest_echoes_every_tier_boundary():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")  # the guest frees its copy before echoing
        link, pool = g.link, host.segment.pool
        for seq, n in enumerate(SIZES):
            data = payload(1, seq, n)
            link.send(data, timeout=10)
            msg = link.recv(timeout=10)
            assert len(msg) == n and msg.tier == _tier(n), (n, msg)
            if msg.tier == "slot":
                # exactly one slot in use, in the smallest class that fits, owned by the host now
                want = list(NO_SLOTS)
                want[class_for(CFG, n)] = 1
                assert allocated(pool) == want, n
                [(_, _, owner)] = allocated_slots(pool, class_for(CFG, n))
                assert owner == 0
            assert memoryview(msg) == data, f"echo of {n} bytes differs"
            msg.release()
            assert allocated(pool) == NO_SLOTS
        counts = _counts(SIZES)
        st = link.stats
        assert (st.sent_inline, st.sent_slot, st.sent_mmap) == counts
        assert (st.recv_inline, st.recv_slot, st.recv_mmap) == counts
        assert st.sent_bytes_inline + st.sent_bytes_slot + st.sent_bytes_mmap == sum(SIZES)
        assert link.try_recv() is None
    assert g.returncode == 0


def test_host_pipelines_guest_echoes_zero_copy():
    """A sender thread streams every size twice while the main thread checks the echoes in order;
    the guest echoes the received Message itself (slot to slot). At most WINDOW messages are in
    flight: an unbounded sender could take every slot (allocation falls through to larger classes)
    and leave none for the echoes."""
    rounds = 2
    order = SIZES * rounds
    window = threading.BoundedSemaphore(8)  # 8 + the guest's echo < 32 slots
    errors = []
    with Host(CFG) as host:
        g = spawn(host, "echo.py")
        link = g.link

        def sender():
            try:
                for seq, n in enumerate(order):
                    if not window.acquire(timeout=20):
                        raise TimeoutError("window never reopened")
                    link.send(payload(2, seq, n), timeout=20)
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=sender)
        t.start()
        try:
            for seq, n in enumerate(order):
                with link.recv(timeout=20) as msg:
                    assert msg.tier == _tier(n)
                    assert memoryview(msg) == payload(2, seq, n), f"seq {seq}: echo of {n} bytes differs"
                window.release()
        finally:
            t.join(30)
        assert not t.is_alive() and not errors
        assert link.try_recv() is None
        # the guest releases each received Message right after echoing it
        wait_until(lambda: allocated(host.segment.pool) == NO_SLOTS, what="all slots free")
    assert g.returncode == 0


def test_guest_sends_host_echoes_every_tier_boundary():
    """The guest's pipelined phase has at most 16 slot messages in flight (one pass of SIZES):
    with the host's echo and the guest's held echo that stays below the pool's 32 slots."""
    seed = 3
    with Host(CFG) as host:
        g = spawn(host, "initiator.py", seed, json.dumps(SIZES), json.dumps(TOO_LARGE))
        link = g.link
        for seq, n in enumerate(SIZES * 2):  # ping-pong phase, then the pipelined phase
            msg = link.recv(timeout=20)
            assert msg.tier == _tier(n) and len(msg) == n, (seq, n, msg)
            assert memoryview(msg) == payload(seed, seq, n), f"seq {seq} ({n} bytes) differs"
            with msg:
                link.send(msg, timeout=20)
        report = json.loads(link.recv_bytes(timeout=20))
        assert report["errors"] == []
        counts = _counts(SIZES * 2)
        gs = report["stats"]
        assert (gs["sent_inline"], gs["sent_slot"], gs["sent_mmap"]) == counts
        assert (gs["recv_inline"], gs["recv_slot"], gs["recv_mmap"]) == counts
        assert link.try_recv() is None  # nothing oversized slipped through
        wait_until(lambda: allocated(host.segment.pool) == NO_SLOTS, what="all slots free")
    assert g.returncode == 0


def test_payload_above_max_payload_size_leaves_the_link_unharmed():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")
        link = g.link
        for n in TOO_LARGE:
            with pytest.raises(shmhub.PayloadTooLarge) as ei:
                link.send(bytes(n), timeout=5)
            assert isinstance(ei.value, ValueError) and isinstance(ei.value, shmhub.ShmhubError)
        assert allocated(host.segment.pool) == NO_SLOTS
        assert link.stats.sent_inline == link.stats.sent_slot == link.stats.sent_mmap == 0
        # the link is unharmed
        for seq, n in enumerate([LARGEST, 0]):
            link.send(payload(4, seq, n), timeout=10)
            assert link.recv_bytes(timeout=10) == payload(4, seq, n)
    assert g.returncode == 0


def test_payload_above_max_payload_size_raises_both_directions():
    """max_payload_size below the largest slot: one byte more raises although a slot would fit."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=4096, max_payload_size=3000, size_classes=((1024, 4), (16 * 1024, 4)))
    sizes = [0, cfg.effective_inline_threshold, 1020, 1021, 3000]
    too_large = [3001, 16380, 16381]
    with Host(cfg) as host:
        g = spawn(host, "initiator.py", 5, json.dumps(sizes), json.dumps(too_large))
        link = g.link
        for n in too_large:
            with pytest.raises(shmhub.PayloadTooLarge):
                link.send(bytes(n), timeout=5)
        for seq, n in enumerate(sizes * 2):
            with link.recv(timeout=20) as msg:
                assert memoryview(msg) == payload(5, seq, n)
                link.send(msg, timeout=20)
        assert json.loads(link.recv_bytes(timeout=20))["errors"] == []
        assert link.try_recv() is None
    assert g.returncode == 0


def _inputs():
    rng = np.random.default_rng(11)
    big = rng.integers(0, 256, 40_000, dtype=np.uint8)
    grid = rng.random((64, 64))  # 32 KiB of float64
    yield "bytearray", bytearray(payload(6, 0, 100))
    yield "bytearray-slot", bytearray(payload(6, 1, 5000))
    yield "memoryview", memoryview(payload(6, 2, 256))
    yield "memoryview-slice", memoryview(payload(6, 3, 9000))[1000:7000]
    yield "memoryview-strided-inline", memoryview(payload(6, 4, 600))[::3]
    yield "memoryview-strided-slot", memoryview(payload(6, 5, 2000))[::2]
    yield "memoryview-reversed", memoryview(payload(6, 6, 300))[::-1]
    yield "memoryview-2d-cast", memoryview(payload(6, 7, 4000)).cast("B", (40, 100))
    yield "memoryview-int32", memoryview(bytearray(payload(6, 8, 800))).cast("i")
    yield "numpy-uint8", big
    yield "numpy-strided", big[::7]
    yield "numpy-int32-strided", np.arange(1000, dtype=np.int32)[::3]
    yield "numpy-fortran-inline", np.arange(60, dtype=np.uint16).reshape(6, 10).T
    yield "numpy-2d-float64", grid
    yield "numpy-fortran-slot", grid.T
    yield "numpy-column", grid[:, 5]
    yield "numpy-0d", np.array(3.5)
    yield "numpy-empty", np.zeros((0, 5))
    yield "numpy-bool", rng.random(300) > 0.5


INPUTS = list(_inputs())


def test_bytes_like_inputs_of_any_layout():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")
        link = g.link
        for name, obj in INPUTS:
            expected = np.ascontiguousarray(obj).tobytes() if isinstance(obj, np.ndarray) else memoryview(obj).tobytes()
            link.send(obj, timeout=10)
            with link.recv(timeout=10) as msg:
                assert msg.tier == _tier(len(expected)), name
                assert msg.tobytes() == expected, name
        for bad in ("text", 12345, None, [1, 2, 3]):
            with pytest.raises(TypeError):
                link.send(bad, timeout=1)
        link.send(b"still fine", timeout=10)
        assert link.recv_bytes(timeout=10) == b"still fine"
        assert allocated(host.segment.pool) == NO_SLOTS
    assert g.returncode == 0


def _slot_msg(link, pool, n, seq):
    data = payload(8, seq, n)
    link.send(data, timeout=10)
    msg = link.recv(timeout=10)
    assert msg.tier == "slot" and len(msg) == n and msg.nbytes == n
    want = list(NO_SLOTS)
    want[class_for(CFG, n)] = 1
    assert allocated(pool) == want
    return msg, data, want


def test_message_zero_copy_and_release():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")
        link, pool, region = g.link, host.segment.pool, host.segment.region
        msg, data, want = _slot_msg(link, pool, 5000, 0)
        c = class_for(CFG, 5000)
        [(s, gen, owner)] = allocated_slots(pool, c)
        assert owner == 0
        mv = memoryview(msg)
        assert mv.readonly and mv.nbytes == 5000 and mv == data
        # zero-copy: the view shows the shared memory itself
        off = pool.payload_offset(c, s)
        assert region.read(off, 5000) == data
        region.write(off + 100, b"\xa5" * 16)
        assert mv[100:116] == b"\xa5" * 16 and msg.tobytes()[100:116] == b"\xa5" * 16
        with pytest.raises(TypeError):
            mv[0] = 1  # read-only
        # release() refuses while a view lives; nothing is freed
        with pytest.raises(BufferError):
            msg.release()
        assert not msg.released and allocated(pool) == want
        mv2 = memoryview(msg)
        mv.release()
        with pytest.raises(BufferError):
            msg.release()
        mv2.release()
        msg.release()
        assert msg.released and allocated(pool) == NO_SLOTS
        assert pool.slot_meta(c, s)[:2] == (gen, 0)  # Free, same generation
        msg.release()  # idempotent
        with pytest.raises(ValueError):
            msg.tobytes()
        with pytest.raises(ValueError):
            memoryview(msg)
        with pytest.raises(ValueError):
            bytes(msg)
        # the freed slot is reused by the next message, under a new generation
        msg, data, _ = _slot_msg(link, pool, 5000, 1)
        assert memoryview(msg) == data
        msg.release()
        assert allocated(pool) == NO_SLOTS
    assert g.returncode == 0


def test_message_with_block_and_gc_release():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")
        link, pool = g.link, host.segment.pool
        # with-block
        msg, data, want = _slot_msg(link, pool, 20_000, 0)
        with msg as m:
            assert m is msg and memoryview(m) == data and allocated(pool) == want
        assert msg.released and allocated(pool) == NO_SLOTS
        # with-block left by an exception
        msg, data, want = _slot_msg(link, pool, 300, 1)
        with pytest.raises(RuntimeError):
            with msg:
                raise RuntimeError("boom")
        assert msg.released and allocated(pool) == NO_SLOTS
        # garbage collection frees it too, with a ResourceWarning (an unclosed file's habit)
        gc_freed = pytest.warns(ResourceWarning, match=r"unreleased <shmhub.Message slot")
        msg, data, want = _slot_msg(link, pool, 70_000, 2)
        with gc_freed:
            del msg
            gc.collect()
        assert allocated(pool) == NO_SLOTS
        # a live memoryview keeps the message (and its slot) alive
        msg, data, want = _slot_msg(link, pool, 1020, 3)
        mv = memoryview(msg)
        del msg
        gc.collect()
        assert allocated(pool) == want and mv == data
        with gc_freed:
            del mv
            gc.collect()
        assert allocated(pool) == NO_SLOTS
        # a message inside a reference cycle is released by the cycle collector
        msg, data, want = _slot_msg(link, pool, LARGEST, 4)
        box = [msg]
        box.append(box)
        with gc_freed:
            del msg, box
            gc.collect()
        assert allocated(pool) == NO_SLOTS
        # a with block that ends while a view lives releases with the last view: no warning
        msg, data, want = _slot_msg(link, pool, 5000, 5)
        with msg:
            mv = memoryview(msg)
        assert allocated(pool) == want and mv == data
        del mv
        assert allocated(pool) == NO_SLOTS
    assert g.returncode == 0


def test_inline_message_semantics():
    with Host(CFG) as host:
        g = spawn(host, "echo.py", "--copy")
        link = g.link
        for n in (0, 17, INLINE):
            link.send(payload(9, n, n), timeout=10)
            msg = link.recv(timeout=10)
            assert msg.tier == "inline" and len(msg) == n and bytes(msg) == payload(9, n, n)
            mv = memoryview(msg)
            with pytest.raises(BufferError):
                msg.release()
            mv.release()
            msg.release()
            assert msg.released
            with pytest.raises(ValueError):
                msg.tobytes()
        assert allocated(host.segment.pool) == NO_SLOTS
    assert g.returncode == 0


def _fill(link, n=INLINE):
    """Send inline messages without waiting until the ring is full; how many went in."""
    sent = 0
    while True:
        try:
            link.send(b"f" * n, timeout=0)
        except shmhub.ShmTimeout:
            return sent
        sent += 1


def test_failed_send_of_a_message_leaves_it_releasable():
    """Forwarding a received Message (`with link.recv() as m: other.send(m)`) when the send fails:
    the caller sees the send's own error, not a BufferError from a view send() left alive."""
    with Host(CFG) as host:
        echo = spawn(host, "echo.py", "--copy")
        idle = spawn(host, "idle.py")
        wait_until(lambda: host.segment.peers.state(idle.peer_id) == 1, what="idle guest attached")
        assert _fill(idle.link, 0) > 0  # 8-byte frames: not even a slot-ref frame fits after this
        pool = host.segment.pool
        for seq, n in enumerate((5000, 100)):  # a slot Message and an inline one
            msg, data = None, payload(10, seq, n)
            echo.link.send(data, timeout=10)
            with pytest.raises(shmhub.ShmTimeout):
                with echo.link.recv(timeout=10) as msg:
                    assert memoryview(msg) == data
                    idle.link.send(msg, timeout=0.05)
            assert msg.released
            assert allocated(pool) == NO_SLOTS  # neither the received slot nor the failed send's slot leaks
    assert echo.returncode == 0 and idle.returncode == 0


def test_release_after_the_segment_is_closed_is_quiet():
    """A Message outliving its link: still readable; release() (or a with block) has nothing to
    give back and must not raise. Guest side: holder.py; host side: after host.close()."""
    cfg = SegmentConfig(max_guests=2, bipbuf_capacity=4096, size_classes=((1024, 4),))
    host = Host(cfg)
    try:
        holder = spawn(host, "holder.py")
        holder.link.send(b"a" * 600, timeout=10)
        holder.link.send(b"b" * 600, timeout=10)
        assert holder.wait(timeout=20) == 0
        ev = wait_event(host, "exited", holder.peer_id)
        assert ev.detail["owned_slots_freed"] == 2  # the slots it held were its own (DECISIONS 9)
        assert allocated(host.segment.pool) == [0]
        echo = spawn(host, "echo.py", "--copy")
        echo.link.send(b"c" * 600, timeout=10)
        msg = echo.link.recv(timeout=10)
    finally:
        host.close()
    assert echo.returncode == 0
    assert msg.tier == "slot" and msg.tobytes() == b"c" * 600
    with msg:
        pass
    assert msg.released
