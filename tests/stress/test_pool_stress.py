"""Cross-process slot pool stress (algorithms.md 2.3, DECISIONS 8): two child processes churn
alloc/free pairs on ONE small shared pool, stamping every slot they get with (pid, peer, counter)
and checking, just before freeing it, that the stamp and the slot's meta are still theirs — a
slot handed out twice is caught. Afterwards every class must be full again with an intact free
list, and the allocation counts the children report must match the generations and ABA tags.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from _stressutil import children, read_line, reap, spawn, walk_pool

from shmhub import Segment, SegmentConfig
from shmhub import layout as L

SEED = 0x9001_0007
# Two classes, three slots: requests of up to 60 payload bytes try class 0 then class 1; larger
# ones only fit class 1, whose single slot the two processes fight over.
SMALL_POOL = ((64, 2), (128, 1))


def churn(n: int, max_hold: int, seeds=(SEED, SEED + 1), *, sabotage=None, stop_on_failure=False, timeout=100.0):
    """Run one churner per seed on a fresh segment; returns (reports, exit codes, walk_pool result or error)."""
    cfg = SegmentConfig(max_guests=len(seeds), bipbuf_capacity=64, size_classes=SMALL_POOL)
    with Segment.create(cfg) as seg:
        if sabotage:
            sabotage(seg)
        procs = [spawn("_pool_churner.py", [seg.fd, n, seed, max_hold, int(stop_on_failure)], pass_fds=(seg.fd,), stdin=subprocess.PIPE) for seed in seeds]
        with children(*procs):
            peers = sorted(int(read_line(p, 60).split()[1]) for p in procs)
            assert peers == list(range(1, len(seeds) + 1)), peers
            for p in procs:  # start them together
                p.stdin.write(b"go\n")
                p.stdin.close()
            deadline = time.monotonic() + timeout
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            outs = [reap(p) for p in procs]
        codes = [p.returncode for p in procs]
        reports = []
        for (out, err), code in zip(outs, codes):
            assert out.strip(), f"churner exited {code} without a report: {err}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
        try:
            pool = walk_pool(seg.pool)
        except AssertionError as e:
            pool = e
        states = [seg.peers.state(p) for p in peers]
    return reports, codes, pool, states


def check_clean_run(n, reports, codes, pool, states):
    for r, code in zip(reports, codes):
        assert r["n_failures"] == 0 and code == 0, f"peer {r['peer']} (pid {r['pid']}): {r['failures']}"
        assert r["pairs"] >= n
    assert states == [L.PEER_GOODBYE] * len(reports)
    # Both churned at the same time for most of their runs (so they really contended).
    overlap = min(r["t_end"] for r in reports) - max(r["t_start"] for r in reports)
    shortest = min(r["t_end"] - r["t_start"] for r in reports)
    assert overlap > 0.5 * shortest, (overlap, shortest)
    assert not isinstance(pool, AssertionError), f"pool not intact after the churn: {pool}"
    # Every allocation bumped its slot's generation once; every alloc and free bumped the ABA tag once.
    for c, cls in enumerate(pool):
        allocs = sum(r["per_class"][c] for r in reports)
        assert allocs > 0, f"class {c} was never used"
        assert cls["generation_sum"] == allocs, (c, cls, allocs)
        assert cls["tag"] == (2 * allocs) & 0xFFFFFFFF, (c, cls, allocs)


@pytest.mark.timeout(120)
def test_two_processes_churn_one_slot_at_a_time():
    n = 100_000
    t0 = time.perf_counter()
    reports, codes, pool, states = churn(n, max_hold=1)
    print(
        f"\n2 x {n} alloc/free pairs in {time.perf_counter() - t0:.2f} s: "
        + "; ".join(f"peer {r['peer']} per class {r['per_class']} exhausted {r['exhausted']}" for r in reports)
    )
    check_clean_run(n, reports, codes, pool, states)
    # The single 128-byte slot is wanted by both: somebody found the pool without a fitting slot.
    assert sum(r["exhausted"] for r in reports) > 0


@pytest.mark.timeout(120)
def test_two_processes_churn_holding_several_slots_freed_in_random_order():
    n = 100_000
    t0 = time.perf_counter()
    reports, codes, pool, states = churn(n, max_hold=4, seeds=(SEED + 2, SEED + 3))
    print(
        f"\n2 x {n} alloc/free pairs holding up to 4 in {time.perf_counter() - t0:.2f} s: "
        + "; ".join(f"peer {r['peer']} per class {r['per_class']} exhausted {r['exhausted']}" for r in reports)
    )
    check_clean_run(n, reports, codes, pool, states)
    # 2 x 4 wanted, 3 exist: both hit exhaustion (backpressure, not an error).
    assert all(r["exhausted"] > 0 for r in reports), reports


@pytest.mark.timeout(60)
def test_churners_detect_a_slot_handed_out_twice():
    """Negative control: with class 0's free list made cyclic (slot 1 -> slot 0) the pool hands
    slot 0 out twice; the churners must report it and walk_pool must reject the free list."""

    def make_cycle(seg):
        meta = seg.layout.classes[0].meta_offset + 1 * L.SLOT_META_SIZE + L.META_NEXT_FREE
        seg.region.store_u32(meta, 0)

    reports, codes, pool, _ = churn(20_000, max_hold=4, seeds=(SEED + 4, SEED + 5), sabotage=make_cycle, stop_on_failure=True)
    assert any(r["n_failures"] for r in reports), reports
    assert 1 in codes, codes
    assert any("0/0" in f for r in reports for f in r["failures"]), reports  # class 0, slot 0
    assert isinstance(pool, AssertionError), pool
