"""One host with 255 guests (issue 12): what the hub costs while everyone is idle, and recv_any's
fairness when every guest is backlogged. Both tests share one module-scoped hub (spawning 255
Python processes is the slow part); SHMHUB_SCALE_GUESTS=8 runs them small for a smoke test."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter

import pytest

import shmhub
from scaleutil import cpu_seconds, host_threads, proc_state, read_exact, sched_seconds, scale_proto as P, spawn

GUESTS = int(os.environ.get("SHMHUB_SCALE_GUESTS", "255"))
IDLE_WINDOW = 10.0  # seconds sampled
IDLE_SETTLE = 2.0  # after every guest said hello and the host sleeps in recv_any
IDLE_LIMIT = 0.05  # of one core: the target is 1 %, asserted with a generous margin
SEED = 1212


class Hub:
    def __init__(self, host, handles, ready_r):
        self.host = host
        self.handles = handles
        self.ready_r = ready_r  # every guest writes one byte here when a burst is complete
        self.idx = {h.peer_id: i for i, h in enumerate(handles)}


@pytest.fixture(scope="module")
def hub():
    cfg = shmhub.SegmentConfig(max_guests=GUESTS, bipbuf_capacity=64 << 10, size_classes=((1024, 8 * GUESTS),))
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    host = shmhub.Host(cfg)
    try:
        t0 = time.monotonic()
        handles = [spawn(host, "worker", i, {"pass_fds": (ready_w,)}, ready_fd=ready_w) for i in range(GUESTS)]
        os.close(ready_w)
        ready_w = -1
        hub = Hub(host, handles, ready_r)
        seen = set()
        while len(seen) < GUESTS:
            h, msg = host.recv_any(timeout=120)
            with msg:
                kind, idx, _ = P.header(msg)
            assert (kind, idx) == (P.HELLO, hub.idx[h.peer_id]), f"expected a hello from guest {hub.idx[h.peer_id]}"
            seen.add(idx)
        print(f"\n{GUESTS} guests spawned and connected in {time.monotonic() - t0:.1f} s")
        yield hub
    finally:
        t0 = time.monotonic()
        host.close()
        print(f"\nhost.close() with {GUESTS} guests: {time.monotonic() - t0:.2f} s")
        if ready_w >= 0:
            os.close(ready_w)
        os.close(ready_r)


def _sample(pids):
    procs = {pid: (cpu_seconds(f"/proc/{pid}/stat"), sched_seconds(f"/proc/{pid}/schedstat")) for pid in pids}
    threads = {}
    for tid, name in host_threads().items():
        try:
            threads[tid] = (name, cpu_seconds(f"/proc/self/task/{tid}/stat"), sched_seconds(f"/proc/self/task/{tid}/schedstat"))
        except FileNotFoundError:
            pass
    return procs, threads


@pytest.mark.timeout(300)
def test_idle_hub_costs_under_5_percent_of_a_core(hub):
    """Every guest blocked in link.recv(), the host blocked in recv_any() in a thread: the 256
    processes together use < 5 % of one core over 10 s (target < 1 %), by utime + stime."""
    host = hub.host
    box = {}

    def serve():
        try:
            box["got"] = host.recv_any(timeout=IDLE_SETTLE + IDLE_WINDOW + 120)
        except BaseException as e:  # reported below
            box["error"] = e

    server = threading.Thread(target=serve, name="recv_any-idle")
    server.start()
    try:
        time.sleep(IDLE_SETTLE)  # a measurement window, not synchronisation: let start-up work finish
        pids = [h.pid for h in hub.handles]
        me = os.getpid()
        procs0, threads0 = _sample(pids + [me])
        t0 = time.monotonic()
        time.sleep(IDLE_WINDOW)
        procs1, threads1 = _sample(pids + [me])
        wall = time.monotonic() - t0
        states = Counter(proc_state(pid) for pid in pids)
    finally:
        hub.handles[0].link.send(P.command("ping", seq=7))  # wakes recv_any: guest 0 answers a pong
        server.join(60)
    assert not server.is_alive(), "recv_any did not return after guest 0's pong"
    assert "error" not in box, f"recv_any raised {box.get('error')!r}"
    h, msg = box["got"]
    with msg:
        assert P.header(msg) == (P.PONG, 0, 7) and h is hub.handles[0]

    guests = sum(procs1[p][0] - procs0[p][0] for p in pids)
    guests_sched = sum(procs1[p][1] - procs0[p][1] for p in pids)  # their main threads (they run no other)
    mine = procs1[me][0] - procs0[me][0]
    # /proc/<pid>/schedstat counts the main thread only: the host's is the sum over its threads
    mine_sched = sum(v[2] - threads0[t][2] for t, v in threads1.items() if t in threads0)
    total = (guests + mine) / wall
    busiest = sorted(((procs1[p][0] - procs0[p][0], i) for i, p in enumerate(pids)), reverse=True)[:3]
    lines = [
        f"idle cost of 1 host + {GUESTS} guests over {wall:.1f} s: {100 * total:.2f} % of one core "
        f"(utime+stime; schedstat: {100 * (guests_sched + mine_sched) / wall:.2f} %)",
        f"  guests {100 * guests / wall:.2f} % (schedstat {100 * guests_sched / wall:.2f} %), "
        f"busiest guests (s, index): {busiest}, guest states {dict(states)}",
        f"  host {100 * mine / wall:.2f} % (schedstat {100 * mine_sched / wall:.2f} %), by thread:",
    ]
    for tid, (name, cpu, sch) in sorted(threads1.items()):
        if tid in threads0:
            lines.append(f"    {name} ({tid}): {100 * (cpu - threads0[tid][1]) / wall:.2f} % (schedstat {100 * (sch - threads0[tid][2]) / wall:.2f} %)")
    print("\n" + "\n".join(lines))
    assert total < IDLE_LIMIT, "\n".join(lines)


def _backlog(hub, seed: int, K: int, lo: int, hi: int) -> None:
    """Every guest writes K messages; returns once all of them are in the rings (no ring is read)."""
    for h in hub.handles:
        h.link.send(P.command("burst", count=K, seed=seed, lo=lo, hi=hi))
    read_exact(hub.ready_r, GUESTS, 120, "guests that completed their burst")


def _check_fair(hub, got: list, seed: int, K: int, k: int, lo: int, hi: int, what: str) -> None:
    """got: (guest index, payload bytes) in the order received. The first GUESTS x k take exactly k
    from each guest; every guest's K messages are complete and in order."""
    want = {i: P.sizes(seed, i, K, lo, hi) for i in range(GUESTS)}
    nxt, errors = Counter(), []
    for i, data in got:
        seq = nxt[i]
        err = P.check(data, P.DATA, i, seq, want[i][seq]) if seq < K else f"guest {i}: more than {K} messages"
        if err:
            errors.append(err)
        nxt[i] += 1
    assert not errors, errors[:10]
    assert all(nxt[i] == K for i in range(GUESTS))
    order = [i for i, _ in got]
    first = Counter(order[: GUESTS * k])
    unfair = {i: first[i] for i in range(GUESTS) if first[i] != k}
    assert not unfair, f"{what}: the first {GUESTS * k} receptions should take exactly {k} from each guest; off: {unfair}"
    # not asserted, for the report: how far from strict rotation the order is
    windows = sum(len(set(order[j : j + GUESTS])) != GUESTS for j in range(0, GUESTS * K, GUESTS))
    print(
        f"\n{what} over {GUESTS} backlogged guests: the first {GUESTS * k} take {k} each; {windows} of {K} consecutive windows of {GUESTS} not a full rotation"
    )


@pytest.mark.timeout(300)
def test_recv_any_round_robin_over_backlogged_guests(hub):
    """Every guest writes K messages (sizes across the inline and slot tiers) before the host reads
    any: the host's first GUESTS x k receptions take exactly k from each guest, and every guest's
    messages arrive complete and in order."""
    K, k, lo, hi = 4, 2, P.HDR.size, 1000
    _backlog(hub, SEED, K, lo, hi)
    got = []
    for _ in range(GUESTS * K):
        h, msg = hub.host.recv_any(timeout=30)
        with msg:
            got.append((hub.idx[h.peer_id], msg.tobytes()))
    _check_fair(hub, got, SEED, K, k, lo, hi, "recv_any")


@pytest.mark.timeout(300)
def test_arecv_any_round_robin_over_backlogged_guests(hub):
    """The same through asyncio: await host.arecv_any()."""
    K, k, lo, hi = 4, 2, P.HDR.size, 1000
    _backlog(hub, SEED + 1, K, lo, hi)

    async def receive():
        got = []
        for _ in range(GUESTS * K):
            h, msg = await hub.host.arecv_any(timeout=30)
            with msg:
                got.append((hub.idx[h.peer_id], msg.tobytes()))
        return got

    _check_fair(hub, asyncio.run(receive()), SEED + 1, K, k, lo, hi, "arecv_any")
