"""No lost wakeups under concurrent blocking traffic on tiny rings; doorbell elision under
streaming; every blocking call honours its timeout and releases the GIL while it waits."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import shmhub
from shmhub import Host, SegmentConfig

from linkutil import Stream, gil_ratio, spawn, wait_until

SEED = 20260
COUNT = 100_000
TINY = SegmentConfig(max_guests=1, bipbuf_capacity=256, size_classes=((1024, 16),))


def _run(target, errors, name):
    def body():
        try:
            target()
        except BaseException as e:  # reported by the test
            errors.append(f"{name}: {type(e).__name__}: {e}")

    t = threading.Thread(target=body, name=name)
    t.start()
    return t


@pytest.mark.timeout(110)
def test_lost_wakeup_torture_256_byte_rings():
    """Host and guest each send and receive at once from two threads, blocking, on 256-byte rings:
    10^5 messages each way (sizes up to the inline limit, every ~50th a slot), nothing lost,
    duplicated or reordered, no hang."""
    inline_max = TINY.effective_inline_threshold
    assert inline_max == 256 // 2 - 8  # clamped to half the ring (DECISIONS 5)
    slot_max = TINY.max_slot_payload
    tx, rx = Stream(SEED, COUNT, inline_max, slot_max), Stream(SEED + 1, COUNT, inline_max, slot_max)
    assert sum(n > inline_max for n in tx.sizes) > COUNT // 100  # the slot tier is exercised too
    errors: list = []
    t0 = time.monotonic()
    with Host(TINY) as host:
        g = spawn(host, "torture.py", SEED, COUNT)
        link = g.link
        progress = {"sent": 0, "received": 0}

        def send_all():
            for seq in range(COUNT):
                link.send(tx.message(seq), timeout=10)
                progress["sent"] = seq + 1

        def recv_all():
            for seq in range(COUNT):
                with link.recv(timeout=10) as msg:
                    err = rx.check(seq, msg)
                assert err is None, err
                progress["received"] = seq + 1

        threads = [_run(send_all, errors, "host sender"), _run(recv_all, errors, "host receiver")]
        for t in threads:
            t.join(100 - (time.monotonic() - t0))
        hung = [t.name for t in threads if t.is_alive()]
        assert not hung, f"hung: {hung}, progress {progress}, stats {link.stats}"
        assert not errors, errors
        assert link.try_recv() is None  # nothing duplicated at the end
        st = link.stats
        assert st.sent_inline + st.sent_slot == COUNT and st.recv_inline + st.recv_slot == COUNT
        elapsed = time.monotonic() - t0
    assert g.returncode == 0, f"guest exit code {g.returncode}"
    print(f"torture: 2 x {COUNT} messages in {elapsed:.1f} s; host stats {st}")
    assert elapsed < 90


def test_streaming_elides_doorbells():
    """Host streams 10^5 small messages to a consuming guest: the doorbell is rung for only a few
    of them; the rest are elided because the guest announced it was awake."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=64 * 1024, size_classes=((1024, 16),))
    args = (SEED + 2, COUNT, 32, cfg.max_slot_payload, 0)
    stream = Stream(*args)
    t0 = time.monotonic()
    with Host(cfg) as host:
        g = spawn(host, "sink.py", *args)
        link = g.link
        for seq in range(COUNT):
            link.send(stream.message(seq), timeout=10)
        guest = json.loads(link.recv_bytes(timeout=30))
        st = link.stats
    elapsed = time.monotonic() - t0
    assert g.returncode == 0
    print(f"streaming: {COUNT} messages in {elapsed:.1f} s; host {st}; guest {guest}")
    assert st.sent_inline == COUNT and guest["recv_inline"] == COUNT
    assert st.doorbells_rung + st.doorbells_elided == COUNT + 1  # one decision per send, + the stats reply
    assert st.doorbells_rung < COUNT / 10, st
    assert st.doorbells_elided > COUNT * 0.9, st
    # the guest rings only for a host waiting for room
    assert guest["doorbells_rung"] < COUNT / 10, guest


TIMEOUTS = (0.05, 0.2)
# Two slots in the whole pool; rings big enough that slot refs never fill them first.
SMALL = SegmentConfig(max_guests=2, bipbuf_capacity=4096, size_classes=((1024, 2),))
SLOT_N = SMALL.effective_inline_threshold + 1


def _idle_host(cfg=SMALL):
    return _idle_host_named("idle.py", cfg)


def _idle_host_named(name, cfg=SMALL):
    host = Host(cfg)
    g = spawn(host, name)
    wait_until(lambda: host.segment.peers.state(g.peer_id) == 1, what="idle guest attached")
    return host, g


def _fill_ring(link) -> int:
    sent = 0
    while True:
        try:
            link.send(b"", timeout=0)
        except shmhub.ShmTimeout:
            return sent
        sent += 1


def _take_all_slots(link):
    for _ in range(sum(c for _, c in link.segment.config.size_classes)):
        link.send(bytes(SLOT_N), timeout=1)
    assert link.segment.pool.counts(0) == (0, 2)


def _timed(fn):
    t0 = time.monotonic()
    with pytest.raises(shmhub.ShmTimeout) as ei:
        fn()
    return time.monotonic() - t0, ei.value


@pytest.mark.parametrize("t", TIMEOUTS)
def test_host_blocking_calls_honour_timeouts(t):
    host, g = _idle_host()
    try:
        link = g.link
        assert link.try_recv() is None
        elapsed, e = _timed(lambda: link.recv(timeout=t))
        assert isinstance(e, TimeoutError) and t <= elapsed < 2 * t, elapsed
        elapsed, _ = _timed(lambda: link.recv(timeout=0))
        assert elapsed < t
        elapsed, _ = _timed(lambda: host.recv_any(timeout=t))
        assert t <= elapsed < 2 * t, elapsed
        # slot exhaustion: the receiver never consumes, so no slot ever comes back
        _take_all_slots(link)
        elapsed, _ = _timed(lambda: link.send(bytes(SLOT_N), timeout=t))
        assert t <= elapsed < 2 * t, elapsed
        assert link.stats.slot_exhaustion_waits == 1 and link.stats.sent_slot == 2
        # a full ring whose consumer never reads
        assert _fill_ring(link) > 0
        for data in (b"", b"x" * 100):
            elapsed, _ = _timed(lambda: link.send(data, timeout=t))
            assert t <= elapsed < 2 * t, elapsed
        assert link.stats.ring_full_waits == 3  # the filling's last attempt + the two timed sends
        assert host.segment.pool.counts(0) == (0, 2)  # a timed-out send leaks no slot
    finally:
        host.close()
    assert g.returncode == 0


@pytest.mark.parametrize("t", TIMEOUTS)
def test_recv_any_timeout_without_guests(t):
    with Host(SMALL) as host:
        elapsed, _ = _timed(lambda: host.recv_any(timeout=t))
        assert t <= elapsed < 2 * t, elapsed


def test_slot_wait_timeout_after_ring_room_frees_the_slot():
    """A slot send whose slot was allocated but whose ring stays full times out and frees the slot."""
    host, g = _idle_host()
    try:
        link = g.link
        _fill_ring(link)
        elapsed, _ = _timed(lambda: link.send(bytes(SLOT_N), timeout=0.05))
        assert 0.05 <= elapsed < 0.1
        assert host.segment.pool.counts(0) == (2, 0)
    finally:
        host.close()
    assert g.returncode == 0


def test_guest_blocking_calls_honour_timeouts_and_release_the_gil():
    with Host(SMALL) as host:
        g = spawn(host, "timeouts.py", json.dumps(TIMEOUTS))
        assert g.wait(timeout=60) == 0


GIL_T = 0.2


def _gil_case(wait):
    ratio, waits = gil_ratio(wait, GIL_T)
    for elapsed, err in waits:
        assert isinstance(err, shmhub.ShmTimeout), err
        assert elapsed >= GIL_T  # the 2x bound is checked without a GIL-hungry thread, above
    return ratio


def test_host_waits_release_the_gil():
    """While the main thread waits in recv / send / recv_any, a counting thread runs at >= 30% of
    the speed it has while the main thread is in time.sleep."""
    host, g = _idle_host()
    try:
        link = g.link
        ratios = {"recv": _gil_case(lambda t: link.recv(timeout=t)), "recv_any": _gil_case(lambda t: host.recv_any(timeout=t))}
        _take_all_slots(link)
        ratios["send (no free slot)"] = _gil_case(lambda t: link.send(bytes(SLOT_N), timeout=t))
        _fill_ring(link)
        ratios["send (ring full)"] = _gil_case(lambda t: link.send(b"x", timeout=t))
        print("GIL ratios", ratios)
        assert all(r >= 0.3 for r in ratios.values()), ratios
    finally:
        host.close()
    assert g.returncode == 0


def test_no_lost_wakeup_when_the_poller_drains_a_byte_meant_for_another_thread():
    """Thread A sleeps in recv() and owns the doorbell; thread B waits in send() for room. B's
    wakeup byte may be drained by A between B's last check and B's wait on the condition: B must
    still wake (DECISIONS 12, trap 32). The interleaving is forced by pausing B just before it
    sleeps until the guest has freed the room, rung, and A has drained the byte and gone back
    to polling. The guest sends nothing, so nothing else would ever wake A."""
    host, g = _idle_host_named("lazy_sink.py")
    link = g.link
    waiter = link._waiter
    errors: list = []
    try:
        receiver = _run(lambda: pytest.raises(shmhub.LinkError, link.recv, timeout=30), errors, "A: recv")
        wait_until(lambda: waiter.polling, what="A polling the doorbell")
        assert _fill_ring(link) > 0
        real_sleep = waiter.sleep
        paused = []

        def sleep(*args, **kwargs):
            if threading.current_thread().name == "B: send" and not paused:
                paused.append(waiter.gen)
                g.process.send_signal(signal.SIGUSR1)  # the guest drains the ring and rings once
                h2g = host.segment.h2g(g.peer_id)
                wait_until(lambda: h2g.indices[0] == h2g.indices[2], what="guest drained the ring")
                wait_until(lambda: waiter.gen > paused[0] and waiter.polling, what="A woke and polls again")
                gen = waiter.gen
                time.sleep(0.05)  # any more bytes were drained too
                wait_until(lambda: waiter.polling and waiter.gen == gen, what="A settled")
            return real_sleep(*args, **kwargs)

        waiter.sleep = sleep
        t0 = time.monotonic()
        sender = _run(lambda: link.send(b"y" * 100, timeout=5), errors, "B: send")
        sender.join(10)
        elapsed = time.monotonic() - t0
        assert paused, "B never slept: the interleaving was not forced"
        assert not errors, f"B: {errors} after {elapsed:.1f} s"
        assert elapsed < 2.5, elapsed
    finally:
        host.close()
        receiver.join(10)
    assert not receiver.is_alive()
    assert g.returncode == 0


def test_a_late_notify_eaten_by_the_rearm_does_not_silence_the_next_message(monkeypatch):
    """A guest commits a frame, is descheduled before its notify, and the host reads the frame and
    re-arms (try_recv() returned None). The late notify claims the host's waiting flag and rings
    while the host drains its doorbell. The guest's next frame must still make fileno() readable:
    the flag the late notify claimed must be announced again after the drain (an announcement
    made before the drain left the flag claimed and the fd quiet; the guest then elided its
    doorbell and recv_any slept with a message waiting: about 1 in 20 runs of the 64-guest pool
    test)."""
    import select

    from shmhub.doorbell import Doorbell
    from shmhub.link import GUEST, HOST, Link
    from shmhub.segment import Segment

    with Segment.create(SMALL) as seg:
        peer = seg.peers.attach()
        bell, guest_sock = Doorbell.pair()
        host, guest = Link(seg, peer, bell, HOST), Link(seg, peer, Doorbell(guest_sock), GUEST)
        try:
            fd = host.fileno()
            assert host.try_recv() is None  # armed: the host's flag is announced, its fd quiet
            assert guest._tx.write_inline(b"first")  # committed; the notify comes late (below)
            with host.try_recv() as msg:
                assert bytes(msg) == b"first"
            real_drain, late = Doorbell.drain, []

            def drain(self):
                if self is bell and not late:  # the late notify lands while the host re-arms
                    late.append(guest._tx.claim_peer_waiting(False))
                    if late[0]:
                        guest.doorbell.ring()
                return real_drain(self)

            monkeypatch.setattr(Doorbell, "drain", drain)
            assert host.try_recv() is None  # re-arms (the late notify lands in it)
            assert late == [True], "the late notify did not find the flag announced: the interleaving was not forced"
            monkeypatch.setattr(Doorbell, "drain", real_drain)
            guest.send(b"second")
            r, _, _ = select.select([fd], [], [], 2)
            assert r, "fileno() stayed quiet with a message waiting (lost wakeup)"
            with host.try_recv() as msg:
                assert bytes(msg) == b"second"
        finally:
            guest.close()
            host.close()
            bell.close()  # a guest's Link closes its doorbell end; a host's Link leaves it to the Host


def test_fileno_becomes_readable_when_a_message_arrives():
    """Link.fileno() for selectors: readable when the peer sends (even with doorbell elision),
    and quiet again once try_recv() has returned None (no busy loop)."""
    import select

    with Host(SMALL) as host:
        g = spawn(host, "greeter.py", 3)  # sends b"hello i" every 0.2 s, unasked
        link = g.link
        fd = link.fileno()
        got, wakes = [], 0
        t0 = time.monotonic()
        while len(got) < 3 and time.monotonic() - t0 < 10:
            r, _, _ = select.select([fd], [], [], 5)
            assert r, f"fileno() not readable within 5 s; received {got}"
            wakes += 1
            while (msg := link.try_recv()) is not None:
                got.append(msg.tobytes())
                msg.release()
        assert got == [b"hello 0", b"hello 1", b"hello 2"]
        assert wakes <= 6, f"{wakes} select() wakeups for 3 messages"
        r, _, _ = select.select([fd], [], [], 0.3)
        assert not r, "fileno() stays readable with nothing to receive"
        assert link.try_recv() is None
    assert g.returncode == 0


def test_the_spin_grows_to_catch_a_peer_that_answers_just_after_it():
    """A peer that answers a little later than spin_ns is caught by no spin: every round trip
    would pay two wake-ups, and no probe would ever leave that state. SPIN_NEAR sleeps in a row
    that ended within SPIN_STRETCH * spin_ns stretch the spin to 1.25x the wait and resume
    spinning; a longer sleep breaks the run; the stretch is capped, and dropped once spins miss."""
    from shmhub.link import GUEST, HOST, Link
    from shmhub.segment import Segment

    with Segment.create(SegmentConfig(max_guests=1)) as seg:
        peer = seg.peers.attach()
        h, g = Link(seg, peer, None, HOST, spin_ns=1000), Link(seg, peer, None, GUEST, spin_ns=1000)
        try:
            for _ in range(3):
                g.spin_result(False)
            assert [g.spin_budget() for _ in range(3)] == [0] * 3  # sleeping at once (the 16th probes)
            g.spin_slept(2000)
            g.spin_slept(100_000)  # a long wait: the run of near ones starts again
            g.spin_slept(2000)
            assert g.spin_budget() == 0
            g.spin_slept(2400)  # two near sleeps in a row: spin 1.25 x 2400 again
            assert [g.spin_budget() for _ in range(3)] == [3000] * 3
            g.spin_slept(3900)
            g.spin_slept(3900)
            assert g.spin_budget() == 4000  # at most SPIN_STRETCH x spin_ns
            g.spin_slept(5000)  # beyond the stretch: nothing changes
            g.spin_slept(5000)
            assert g.spin_budget() == 4000
            for _ in range(3):
                g.spin_result(False)
            g.spin_result(True)
            assert g.spin_budget() == 1000  # misses dropped the stretch
            z = Link(seg, peer, None, GUEST, spin_ns=0)
            z.spin_slept(10)
            z.spin_slept(10)
            assert z.spin_budget() == 0  # spinning off stays off
            z.close()
        finally:
            g.close()
            h.close()


def test_adaptive_spin_probes_less_often_while_probes_miss():
    """After SPIN_MISSES spins in a row that caught nothing, waits sleep at once and only every
    gap-th wait probes with a full spin; each probe that misses doubles the gap (up to 1024), one
    that pays restores spinning. A recv that finds its message at once is not a wait: it leaves the
    count alone."""
    from shmhub.link import GUEST, HOST, Link
    from shmhub.segment import Segment

    def probes(link, waits):
        """Indices (1-based) of the waits among `waits` that get a spin budget."""
        return [i for i in range(1, waits + 1) if link.spin_budget()]

    with Segment.create(SegmentConfig(max_guests=1)) as seg:
        peer = seg.peers.attach()
        h, g = Link(seg, peer, None, HOST, spin_ns=1000), Link(seg, peer, None, GUEST, spin_ns=1000)
        try:
            for _ in range(3):  # a single miss, or two, change nothing
                assert g.spin_budget() == 1000
                g.spin_result(False)
            for _ in range(100):  # found at once: no wait, no count
                h.send(b"x")
                assert g.recv(1.0).tobytes() == b"x"
            gap = 16
            while gap <= 1024:
                assert probes(g, gap) == [gap]
                g.spin_result(False)  # the probe missed: twice as long until the next
                gap *= 2
            assert probes(g, 1024) == [1024]  # capped
            g.spin_result(True)
            assert g.spin_budget() == 1000 and g.spin_budget() == 1000  # spinning again
        finally:
            g.close()
            h.close()
