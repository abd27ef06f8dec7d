"""The peer table (format-v7 1.3, algorithms.md 2.4, traps 16 and 34)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub.errors import PeerError, PeerStateError, PeerTableFull, SegmentCorrupted

EMPTY, ATTACHED, GOODBYE, RESERVED = L.PEER_EMPTY, L.PEER_ATTACHED, L.PEER_GOODBYE, L.PEER_RESERVED
GUESTS = 4
INTERVAL = 1_000_000


def make(max_guests=GUESTS):
    cfg = SegmentConfig(max_guests=max_guests, bipbuf_capacity=64, heartbeat_interval_ns=INTERVAL, size_classes=((64, 1),))
    return Segment.create(cfg)


@pytest.fixture
def seg():
    s = make()
    yield s
    s.close()


@pytest.fixture
def peers(seg):
    return seg.peers


def entry(seg, peer_id):
    """(state, epoch, last_heartbeat, ring_offset) read straight from the entry bytes (format-v7 1.3)."""
    off = L.PEER_TABLE_OFFSET + (peer_id - 1) * L.PEER_ENTRY_SIZE
    raw = seg.region.read(off, L.PEER_ENTRY_SIZE)
    u32 = lambda o: int.from_bytes(raw[o : o + 4], "little")  # noqa: E731
    u64 = lambda o: int.from_bytes(raw[o : o + 8], "little")  # noqa: E731
    # bytes 24..56 carry a link's mmap-tier counters (FEATURE_MMAP_LEASES): only links write
    # them, never the peer table, and no link exists in these tests
    ext = L.PEER_EXT_END - L.PEER_G2H_MAPPINGS
    assert raw[L.PEER_G2H_MAPPINGS : L.PEER_EXT_END] == bytes(ext), "the peer table must not write the mmap counters or the pool journal"
    assert raw[L.PEER_EXT_END :] == bytes(L.PEER_ENTRY_SIZE - L.PEER_EXT_END), "reserved bytes of a peer entry must stay zero"
    return u32(0), u32(4), u64(8), u64(16)


def test_fresh_table(seg, peers):
    assert peers.max_guests == GUESTS
    for p in range(1, GUESTS + 1):
        assert entry(seg, p) == (EMPTY, 0, 0, seg.layout.ring_offset(p))
        assert peers.state(p) == EMPTY and peers.state_name(p) == "Empty"
        assert peers.epoch(p) == 0 and peers.last_heartbeat(p) == 0
        assert peers.ring_offset(p) == seg.layout.ring_offset(p)


def test_reserve_then_claim(seg, peers):
    p = peers.reserve()
    assert p == 1
    assert entry(seg, 1)[:3] == (RESERVED, 1, 0)  # Empty -> Reserved, epoch += 1
    assert peers.state_name(1) == "Reserved"
    before = time.monotonic_ns()
    peers.claim(1)
    after = time.monotonic_ns()
    state, epoch, hb, _ = entry(seg, 1)
    assert (state, epoch) == (ATTACHED, 1)  # claim: Reserved -> Attached, epoch unchanged
    assert before <= hb <= after  # trap 34: a fresh claim writes a heartbeat at once
    assert not peers.is_stale(1, INTERVAL, hb + INTERVAL)
    # the other entries are untouched
    assert all(entry(seg, q)[:3] == (EMPTY, 0, 0) for q in range(2, GUESTS + 1))


def test_reserve_takes_first_empty_in_order(peers):
    assert [peers.reserve() for _ in range(GUESTS)] == list(range(1, GUESTS + 1))
    assert all(peers.epoch(p) == 1 for p in range(1, GUESTS + 1))


def test_release_reserved(seg, peers):
    p = peers.reserve()
    peers.release_reserved(p)
    assert entry(seg, p)[:3] == (EMPTY, 1, 0)  # Reserved -> Empty, epoch kept
    assert peers.reserve() == p
    assert peers.epoch(p) == 2  # bumped again, never reset


@pytest.mark.parametrize("state", [EMPTY, ATTACHED, GOODBYE])
def test_release_reserved_requires_reserved(seg, peers, state):
    seg.region.store_u32(seg.layout.peer_entry_offset(2) + L.PEER_STATE, state)
    with pytest.raises(PeerStateError):
        peers.release_reserved(2)
    assert peers.state(2) == state and peers.epoch(2) == 0


@pytest.mark.parametrize("state", [EMPTY, ATTACHED, GOODBYE])
def test_claim_requires_reserved(seg, peers, state):
    seg.region.store_u32(seg.layout.peer_entry_offset(2) + L.PEER_STATE, state)
    with pytest.raises(PeerStateError) as ei:
        peers.claim(2)
    assert "Reserved" in str(ei.value)
    assert entry(seg, 2)[:3] == (state, 0, 0)  # no state change, no heartbeat
    assert issubclass(PeerStateError, PeerError)


def test_claim_twice_fails(peers):
    p = peers.reserve()
    peers.claim(p)
    with pytest.raises(PeerStateError):
        peers.claim(p)
    assert peers.state(p) == ATTACHED


def test_attach_walk_in(seg, peers):
    before = time.monotonic_ns()
    p = peers.attach()
    after = time.monotonic_ns()
    state, epoch, hb, _ = entry(seg, p)
    assert (p, state, epoch) == (1, ATTACHED, 1)  # Empty -> Attached, epoch += 1
    assert before <= hb <= after  # trap 34
    assert not peers.is_stale(p, INTERVAL)


def test_detach_and_reset_cycle(seg, peers):
    p = peers.attach()
    peers.detach(p)
    state, epoch, hb, _ = entry(seg, p)
    assert (state, epoch) == (GOODBYE, 1) and hb != 0
    # a Goodbye entry is not Empty: reserve and attach skip it
    assert peers.reserve() == 2
    peers.reset(p)
    assert entry(seg, p)[:3] == (EMPTY, 1, 0)  # heartbeat 0, state Empty, epoch never reset
    assert peers.attach() == p
    assert peers.epoch(p) == 2
    assert peers.ring_offset(p) == seg.layout.ring_offset(p)  # written once, never touched


def test_reset_zeroes_the_mmap_counters_and_nothing_else(seg, peers):
    # docs/extensions.md bits 1 and 3: recovery of a peer zeroes bytes 24..64 of its entry (mmap
    # counters and pool journal); the ring offset, the epoch and the neighbours are left alone
    p = peers.attach()
    base = seg.layout.peer_entry_offset(p)
    r = seg.region
    r.store_u32(base + L.PEER_G2H_MAPPINGS, 3)
    r.store_u32(base + L.PEER_H2G_MAPPINGS, 4)
    r.store_u32(base + L.PEER_G2H_LEASES, 5)
    r.store_u32(base + L.PEER_H2G_LEASES, 6)
    r.store_u32(base + L.PEER_G2H_MAPPED_KIB, 7 << 20)
    r.store_u32(base + L.PEER_H2G_MAPPED_KIB, 8)
    r.store_u64(base + L.PEER_POOL_OP, (L.POOL_OP_POP << 56) | 5)
    r.store_u32(base + L.PEER_POOL_OP_GEN, 9)
    assert peers.mmap_counters(p) == {
        "g2h": {"mappings": 3, "mapped_bytes": 7 << 30, "leases": 5},
        "h2g": {"mappings": 4, "mapped_bytes": 8 << 10, "leases": 6},
    }
    r.write(base + L.PEER_EXT_END, b"\xee" * (L.PEER_ENTRY_SIZE - L.PEER_EXT_END))
    others = [r.read(seg.layout.peer_entry_offset(q), L.PEER_ENTRY_SIZE) for q in range(1, GUESTS + 1) if q != p]
    peers.detach(p)
    peers.reset(p)
    raw = r.read(base, L.PEER_ENTRY_SIZE)
    assert raw[L.PEER_G2H_MAPPINGS : L.PEER_EXT_END] == bytes(L.PEER_EXT_END - L.PEER_G2H_MAPPINGS)
    assert raw[L.PEER_EXT_END :] == b"\xee" * (L.PEER_ENTRY_SIZE - L.PEER_EXT_END)
    assert peers.mmap_counters(p) == {"g2h": {"mappings": 0, "mapped_bytes": 0, "leases": 0}, "h2g": {"mappings": 0, "mapped_bytes": 0, "leases": 0}}
    assert (peers.state(p), peers.epoch(p), peers.last_heartbeat(p)) == (EMPTY, 1, 0)
    assert peers.ring_offset(p) == seg.layout.ring_offset(p)
    assert [r.read(seg.layout.peer_entry_offset(q), L.PEER_ENTRY_SIZE) for q in range(1, GUESTS + 1) if q != p] == others
    r.zero(base + L.PEER_EXT_END, L.PEER_ENTRY_SIZE - L.PEER_EXT_END)


def test_reserve_scans_on_past_taken_entries(seg, peers):
    # algorithms.md 2.4: upstream returned "none" when its CAS lost; we keep scanning. Entries
    # that are not Empty (as after another process won them) are skipped.
    put = lambda p, s: seg.region.store_u32(seg.layout.peer_entry_offset(p) + L.PEER_STATE, s)  # noqa: E731
    put(1, ATTACHED)
    put(2, RESERVED)
    put(3, GOODBYE)
    assert peers.reserve() == 4
    assert [peers.epoch(p) for p in range(1, 5)] == [0, 0, 0, 1]
    put(2, EMPTY)
    assert peers.attach() == 2
    assert peers.state(2) == ATTACHED


@pytest.mark.parametrize("op", ["reserve", "attach"])
def test_table_full(seg, peers, op):
    for _ in range(GUESTS):
        getattr(peers, op)()
    snapshot = seg.region.read(L.PEER_TABLE_OFFSET, GUESTS * L.PEER_ENTRY_SIZE)
    with pytest.raises(PeerTableFull) as ei:
        getattr(peers, op)()
    assert "max_guests" in str(ei.value)
    assert seg.region.read(L.PEER_TABLE_OFFSET, GUESTS * L.PEER_ENTRY_SIZE) == snapshot
    assert issubclass(PeerTableFull, PeerError)


def test_unknown_state_is_corruption(seg, peers):
    seg.region.store_u32(seg.layout.peer_entry_offset(1) + L.PEER_STATE, 9)
    with pytest.raises(SegmentCorrupted):
        peers.state(1)
    assert peers.state_name(1) == "Unknown"
    assert peers.reserve() == 2  # an unknown entry is never taken as Empty
    with pytest.raises(PeerStateError):
        peers.claim(1)


# --- heartbeats (trap 34, algorithms.md 2.5) --------------------------------------------------


def test_heartbeat_and_staleness(seg, peers):
    p = peers.reserve()
    assert peers.last_heartbeat(p) == 0
    # 0 means "not yet": never stale, whatever the clock says
    assert not peers.is_stale(p, INTERVAL, now_ns=10**18)
    peers.heartbeat(p, now_ns=5_000)
    assert entry(seg, p)[2] == 5_000
    assert not peers.is_stale(p, INTERVAL, now_ns=5_000)
    assert not peers.is_stale(p, INTERVAL, now_ns=5_000 + 2 * INTERVAL)  # exactly 2x: still alive
    assert peers.is_stale(p, INTERVAL, now_ns=5_000 + 2 * INTERVAL + 1)
    assert not peers.is_stale(p, 0, now_ns=10**18)  # interval 0 disables
    assert not peers.is_stale(p, INTERVAL, now_ns=0)  # clock behind the heartbeat: saturates at 0
    peers.heartbeat(p)
    assert abs(peers.last_heartbeat(p) - time.monotonic_ns()) < 10**9
    assert not peers.is_stale(p, INTERVAL)


def test_heartbeat_u64(peers):
    big = (1 << 64) - 1
    peers.heartbeat(1, now_ns=big)
    assert peers.last_heartbeat(1) == big


def test_reset_clears_heartbeat_so_reattach_is_fresh(peers):
    p = peers.attach()
    peers.heartbeat(p, now_ns=1)
    assert peers.is_stale(p, INTERVAL, now_ns=10 * INTERVAL)
    peers.detach(p)
    peers.reset(p)
    assert peers.last_heartbeat(p) == 0
    assert not peers.is_stale(p, INTERVAL, now_ns=10 * INTERVAL)
    assert peers.attach() == p
    assert not peers.is_stale(p, INTERVAL)


# --- trap 16: peer ids out of range -----------------------------------------------------------

BAD_IDS = [0, -1, GUESTS + 1, 255, 256, 1 << 40]


@pytest.mark.parametrize("peer_id", BAD_IDS)
def test_out_of_range_peer_ids_raise(seg, peers, peer_id):
    # trap 16: no operation may touch bytes outside the peer table (peer 0 would be the header)
    snapshot = seg.region.read(0, seg.layout.ring_base + 2 * seg.layout.ring_stride)
    calls = [
        lambda: peers.state(peer_id),
        lambda: peers.epoch(peer_id),
        lambda: peers.last_heartbeat(peer_id),
        lambda: peers.ring_offset(peer_id),
        lambda: peers.release_reserved(peer_id),
        lambda: peers.claim(peer_id),
        lambda: peers.detach(peer_id),
        lambda: peers.reset(peer_id),
        lambda: peers.heartbeat(peer_id, now_ns=123),
        lambda: peers.is_stale(peer_id, INTERVAL),
        lambda: seg.layout.peer_entry_offset(peer_id),
        lambda: seg.layout.ring_offset(peer_id),
        lambda: seg.g2h(peer_id),
        lambda: seg.h2g(peer_id),
    ]
    for call in calls:
        with pytest.raises((ValueError, PeerError)):
            call()
    assert seg.region.read(0, seg.layout.ring_base + 2 * seg.layout.ring_stride) == snapshot


# --- concurrency: every peer id handed out exactly once ----------------------------------------


def _grab_all(peers, op):
    got = []
    while True:
        try:
            got.append(getattr(peers, op)())
        except PeerTableFull:
            return got


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["reserve", "attach"])
def test_concurrent_threads_get_distinct_ids(op):
    n = 128
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # let threads switch between the load and the CAS of the scan
    try:
        with make(n) as seg:
            for _ in range(5):
                barrier = threading.Barrier(2)
                results = [None, None]

                def worker(i):
                    barrier.wait()
                    results[i] = _grab_all(seg.peers, op)

                ts = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                a, b = results
                assert not set(a) & set(b), f"ids handed out twice: {sorted(set(a) & set(b))}"
                assert sorted(a + b) == list(range(1, n + 1))
                for p in range(1, n + 1):
                    assert seg.peers.state(p) == (RESERVED if op == "reserve" else ATTACHED)
                    seg.peers.reset(p)
            # five rounds: every entry's epoch bumped exactly once per round
            assert all(seg.peers.epoch(p) == 5 for p in range(1, n + 1))
    finally:
        sys.setswitchinterval(old)


def _fork_grab(seg, op, go_r):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            os.read(go_r, 1)
            data = json.dumps(_grab_all(seg.peers, op)).encode()
            while data:
                data = data[os.write(w, data) :]
        except BaseException:
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid, r):
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed"
    return json.loads(b"".join(chunks))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["reserve", "attach"])
def test_concurrent_processes_get_distinct_ids(op):
    n = L.MAX_GUESTS_LIMIT
    with make(n) as seg:
        for round_ in range(3):
            go_r, go_w = os.pipe()
            try:
                kids = [_fork_grab(seg, op, go_r) for _ in range(2)]
                os.write(go_w, b"xx")
            finally:
                os.close(go_r)
                os.close(go_w)
            a, b = (_collect(pid, r) for pid, r in kids)
            assert not set(a) & set(b), f"round {round_}: ids handed out twice: {sorted(set(a) & set(b))}"
            assert sorted(a + b) == list(range(1, n + 1))
            for p in range(1, n + 1):
                assert seg.peers.state(p) == (RESERVED if op == "reserve" else ATTACHED)
                assert seg.peers.epoch(p) == round_ + 1
                seg.peers.reset(p)


def test_guest_mapping_claims_what_host_reserved(seg):
    p = seg.peers.reserve()
    with Segment.attach(seg.fd) as guest:
        guest.peers.claim(p)
        assert seg.peers.state(p) == ATTACHED
        assert seg.peers.last_heartbeat(p) != 0
        guest.peers.detach(p)
    assert seg.peers.state(p) == GOODBYE
