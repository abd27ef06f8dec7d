"""Batch and zero-copy APIs: send_many / recv_many, reserve / send_reserved, empty / send_array /
recv_array. Both ends live in this process (one mapping), so zero copy shows as equal addresses."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from shmhub import Segment, SegmentConfig
from shmhub.bigmap import socketpair
from shmhub.codec import CodecError
from shmhub.errors import ShmTimeout
from shmhub.link import GUEST, HOST, Link

pytestmark = pytest.mark.timeout(60)
TIMEOUT = 10.0
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=16 * 1024, size_classes=((1024, 32), (16 * 1024, 8), (256 * 1024, 4)))


@pytest.fixture
def pair():
    """(host end, guest end) of one peer, with an mmap tier."""
    with Segment.create(CONFIG) as seg:
        peer = seg.peers.attach()
        a, b = socketpair()
        h, g = Link(seg, peer, None, HOST, control=a), Link(seg, peer, None, GUEST, control=b)
        try:
            yield h, g
        finally:
            g.close()
            h.close()
            a.close()
            b.close()


def addr(buf) -> int:
    return np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]


def pattern(k: int, n: int) -> bytes:
    return bytes((k * 7 + j) & 0xFF for j in range(min(n, 64))) * (n // 64) + bytes(n % 64)


def drain(link, count: int, out: list) -> None:
    while len(out) < count:
        for m in link.recv_many(count - len(out), timeout=TIMEOUT):
            out.append(bytes(m))
            if hasattr(m, "release"):
                m.release()


def test_send_many_list_of_every_tier_in_order(pair):
    h, g = pair
    rnd = random.Random(5)
    sizes = [rnd.choice([0, 1, 200, 256, 257, 1000, 5000, 16000, 100_000, 300_000]) for _ in range(60)]
    items = [pattern(k, n) for k, n in enumerate(sizes)]
    got: list = []
    t = threading.Thread(target=drain, args=(g, len(items), got))
    t.start()
    assert h.send_many(items, timeout=TIMEOUT) == len(items)
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert got == items
    st = h.stats
    assert st.sent_inline and st.sent_slot and st.sent_mmap
    assert st.sent_inline + st.sent_slot + st.sent_mmap == len(items)


@pytest.mark.parametrize("row_bytes", [8, 64, 256, 4000])
def test_send_many_rows_of_a_2d_array(pair, row_bytes):
    """Each row is one message, in order, past the ring's capacity (the sender waits for room)."""
    h, g = pair
    count = 3000 if row_bytes <= 256 else 200
    rows = np.random.default_rng(row_bytes).integers(0, 256, size=(count, row_bytes), dtype=np.uint8)
    got: list = []
    t = threading.Thread(target=drain, args=(g, count, got))
    t.start()
    assert h.send_many(rows, timeout=TIMEOUT) == count
    t.join(TIMEOUT)
    assert not t.is_alive()
    assert got == [r.tobytes() for r in rows]
    if row_bytes <= 256:
        assert h.stats.sent_inline == count  # batched inline by the core
    else:
        assert h.stats.sent_slot == count


def test_send_many_rows_of_wider_items(pair):
    h, g = pair
    rows = np.arange(40, dtype="<u4").reshape(10, 4)
    assert h.send_many(rows) == 10
    assert [bytes(m) for m in g.recv_many(100, timeout=TIMEOUT)] == [r.tobytes() for r in rows]


def test_send_many_refuses_what_is_not_rows(pair):
    h, g = pair
    with pytest.raises(TypeError):
        h.send_many(b"abc")  # 1-D: ambiguous, refused
    with pytest.raises(TypeError):
        h.send_many(np.zeros((4, 8), np.uint8)[:, ::2])  # not C-contiguous
    assert h.send_many(np.zeros((0, 8), np.uint8)) == 0
    assert g.try_recv() is None


def test_recv_many_bounds_and_timeout(pair):
    h, g = pair
    with pytest.raises(ShmTimeout):
        g.recv_many(5, timeout=0.05)
    with pytest.raises(ValueError):
        g.recv_many(0)
    h.send_many([b"a", b"bb", b"c" * 2000, b"dd"])
    first = g.recv_many(3, timeout=TIMEOUT)
    assert [bytes(m) for m in first] == [b"a", b"bb", b"c" * 2000]
    assert [type(m).__name__ for m in first] == ["bytes", "bytes", "Message"]  # inline ones are bytes
    first[2].release()
    assert [bytes(m) for m in g.recv_many(10, timeout=TIMEOUT)] == [b"dd"]


@pytest.mark.parametrize("nbytes", [100, 5000, 200_000, 1 << 20])
def test_reserve_send_reserved_is_zero_copy(pair, nbytes):
    h, g = pair
    buf = h.reserve(nbytes, timeout=TIMEOUT)
    assert buf.writable and len(buf) == nbytes
    with memoryview(buf) as v:
        v[:] = pattern(3, nbytes)
    sent_at = addr(buf)
    h.send_reserved(buf, timeout=TIMEOUT)
    with pytest.raises(ValueError):
        h.send_reserved(buf)  # sent already: it is the receiver's now
    m = g.recv(timeout=TIMEOUT)
    assert m.tier == ("slot" if nbytes <= CONFIG.max_slot_payload else "mmap")
    assert bytes(m) == pattern(3, nbytes)
    if m.tier == "slot":
        assert addr(m) == sent_at  # the same shared bytes, not a copy
    m.release()


def test_reserved_buffer_released_unsent_goes_back(pair):
    h, g = pair
    pool = h.segment.pool
    before = [pool.counts(c) for c in range(pool.num_classes)]
    buf = h.reserve(3000)
    assert [pool.counts(c) for c in range(pool.num_classes)] != before
    buf.release()
    assert [pool.counts(c) for c in range(pool.num_classes)] == before
    with pytest.raises(ValueError):
        h.send_reserved(buf)  # released: nothing to send any more


def counts(pool):
    return [pool.counts(c) for c in range(pool.num_classes)]


@pytest.mark.parametrize("with_view", [False, True])
def test_sent_reserved_buffer_belongs_to_the_receiver(pair, with_view):
    """After send_reserved the sender's object no longer frees the slot, even with a view of it
    alive when it was sent: only the receiver's release gives it back."""
    h, g = pair
    pool = h.segment.pool
    before = counts(pool)
    buf = h.reserve(3000, timeout=TIMEOUT)
    view = memoryview(buf)
    view[:] = pattern(5, 3000)
    if not with_view:
        view.release()
    h.send_reserved(buf, 2000, timeout=TIMEOUT)
    view.release()
    del buf, view
    m = g.recv(timeout=TIMEOUT)
    assert bytes(m) == pattern(5, 3000)[:2000]
    assert counts(pool) != before  # still held: by the receiver's message
    m.release()
    assert counts(pool) == before


def test_send_reserved_waits_for_ring_room(pair):
    """A full ring: send_reserved times out and the buffer stays the sender's, sendable later."""
    h, g = pair
    pool = h.segment.pool
    before = counts(pool)
    sent = 0
    while True:  # fill the ring with inline frames
        try:
            h.send(b"%08d" % sent, timeout=0)
        except ShmTimeout:
            break
        sent += 1
    buf = h.reserve(5000, timeout=TIMEOUT)
    memoryview(buf)[:] = pattern(6, 5000)
    with pytest.raises(ShmTimeout):
        h.send_reserved(buf, timeout=0.05)
    assert not buf.released
    assert [bytes(g.recv(timeout=TIMEOUT)) for _ in range(sent)] == [b"%08d" % i for i in range(sent)]
    h.send_reserved(buf, timeout=TIMEOUT)
    with g.recv(timeout=TIMEOUT) as m:
        assert bytes(m) == pattern(6, 5000)
    assert counts(pool) == before


def test_reserve_times_out_on_an_exhausted_pool(pair):
    h, g = pair
    held = [h.reserve(200_000, timeout=TIMEOUT) for _ in range(CONFIG.size_classes[2][1])]
    with pytest.raises(ShmTimeout):
        h.reserve(200_000, timeout=0.05)
    held.pop().release()
    h.reserve(200_000, timeout=TIMEOUT).release()
    for b in held:
        b.release()


def test_send_reserved_refuses_a_buffer_of_another_link(pair):
    h, g = pair
    buf = g.reserve(100)
    with pytest.raises(ValueError):
        h.send_reserved(buf)
    with pytest.raises(ValueError):
        g.send_reserved(buf, nbytes=101)
    buf.release()


@pytest.mark.parametrize("shape,dtype", [((10,), "u1"), ((300, 7), "<f8"), ((64, 64, 3), "<i2"), ((512, 512), "<f4")])
def test_empty_send_array_is_zero_copy_and_aligned(pair, shape, dtype):
    h, g = pair
    a = h.empty(shape, dtype)
    assert a.shape == shape and a.dtype == np.dtype(dtype)
    assert a.__array_interface__["data"][0] % 64 == 0
    want = np.random.default_rng(1).integers(0, 100, size=shape).astype(dtype)
    a[...] = want
    at = a.__array_interface__["data"][0]
    h.send_array(a, timeout=TIMEOUT)
    del a
    b = g.recv_array(timeout=TIMEOUT)
    assert b.shape == shape and b.dtype == np.dtype(dtype) and not b.flags.writeable
    assert np.array_equal(b, want)
    assert b.__array_interface__["data"][0] % 64 == 0
    if h.stats.sent_slot:
        assert b.__array_interface__["data"][0] == at  # received where it was written
    del b


def test_send_array_copies_private_and_strided_arrays(pair):
    h, g = pair
    rng = np.random.default_rng(2)
    for a in (
        rng.random((50, 40)),
        rng.random((50, 40))[::2, ::3],
        np.asfortranarray(rng.random((9, 5))),
        np.arange(12, dtype="<i8").reshape(3, 4),
        np.float32(2.5) * np.ones(()),
        rng.random((600, 600)),
    ):
        h.send_array(a, timeout=TIMEOUT)
        b = g.recv_array(timeout=TIMEOUT)
        assert b.shape == a.shape and b.dtype == a.dtype and np.array_equal(a, b)
        assert b.__array_interface__["data"][0] % 64 == 0
        del b


def test_big_array_hand_over_reuses_its_mapping(pair):
    """Repeated hand-overs of an mmap-tier array reuse one mapping (no fresh pages each time)."""
    h, g = pair
    for k in range(6):
        a = h.empty((1 << 20,), "u1")
        a[:] = k
        h.send_array(a, timeout=TIMEOUT)
        del a
        b = g.recv_array(timeout=TIMEOUT)
        assert b[0] == k and b[-1] == k
        del b
    assert h.mappings["tx_created"] == 1 and h.mappings["tx_reused"] >= 5


def test_recv_array_refuses_other_payloads(pair):
    h, g = pair
    h.send(b"not an array at all")
    with pytest.raises(CodecError):
        g.recv_array(timeout=TIMEOUT)
    with pytest.raises(CodecError):
        h.send_array(np.array([object()]))


@pytest.mark.parametrize("shift", [0, 16, 100, 4000])
def test_big_array_copy_lands_at_the_sources_page_offset(pair, shift):
    """A copy whose destination sits just after its source's page offset runs several times
    slower (4K aliasing): big arrays are placed at the source's offset rounded down to 64."""
    h, g = pair
    src = np.arange(200_000 + shift, dtype=np.uint32).view(np.uint8)[shift : shift + 600_000]
    h.send_array(src, timeout=TIMEOUT)
    b = g.recv_array(timeout=TIMEOUT)
    assert np.array_equal(b, src)
    assert b.__array_interface__["data"][0] % 4096 == src.__array_interface__["data"][0] % 4096 // 64 * 64
    del b
    a = h.empty((600_000,), "u1")
    assert a.__array_interface__["data"][0] % 4096 == 0
    del a


def test_ring_counters_count_every_send_path(pair):
    """FEATURE_RING_COUNTERS: the producer's running totals in the ring header (what `shmhub top`
    reads from another process) agree with the link's own counters after every kind of send."""
    h, g = pair
    ring = h.segment.h2g(h.peer_id)
    assert ring.counting and ring.sent == (0, 0)

    def check():
        st = h.stats()
        sent = (st["sent_inline"] + st["sent_slot"] + st["sent_mmap"], st["sent_bytes_inline"] + st["sent_bytes_slot"] + st["sent_bytes_mmap"])
        assert ring.sent == sent, (ring.sent, st)
        while (m := g.try_recv()) is not None:
            if not isinstance(m, bytes):
                m.release()

    for n in (0, 100, 5000, 200_000, 1 << 20):  # inline, slot, mmap
        h.send(b"s" * n, timeout=TIMEOUT)
        check()
    h.send_many([b"a", b"bb" * 100, b"c" * 3000], timeout=TIMEOUT)
    check()
    buf = h.reserve(4000, timeout=TIMEOUT)
    h.send_reserved(buf, timeout=TIMEOUT)
    check()
    h.send_array(np.arange(1000, dtype=np.uint8), timeout=TIMEOUT)
    check()
    assert ring.sent[0] == 10
    ring.reset()  # what recovery does: a new guest on this peer id starts at zero
    assert ring.sent == (0, 0)
    assert g.segment.g2h(g.peer_id).sent == (0, 0)  # the other direction: nothing sent


def test_a_v7_segment_has_no_ring_counters():
    with Segment.create(CONFIG, features=0) as seg:
        peer = seg.peers.attach()
        h, g = Link(seg, peer, None, HOST), Link(seg, peer, None, GUEST)
        try:
            h.send(b"x" * 10)
            assert bytes(g.recv(TIMEOUT)) == b"x" * 10
            ring = seg.h2g(peer)
            assert not ring.counting and ring.sent is None
            assert seg.region.read(ring.offset + 16, 16) == bytes(16)  # the v7 padding stays zero
        finally:
            g.close()
            h.close()


def test_send_many_takes_any_iterable(pair):
    """A tuple and a generator of payloads go out like a list (the core's batch writer takes a list:
    a tuple once raised TypeError there)."""
    h, g = pair
    for payloads in ((b"a", b"bb", b"c" * 3000), (bytes([i]) * 10 for i in range(5))):
        want = list(payloads) if isinstance(payloads, tuple) else [bytes([i]) * 10 for i in range(5)]
        assert h.send_many(payloads, timeout=TIMEOUT) == len(want)
        got = []
        for _ in want:
            with g.recv(timeout=TIMEOUT) as m:
                got.append(m.tobytes())
        assert got == want
