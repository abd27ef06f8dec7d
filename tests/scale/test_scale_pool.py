"""The slot pool under many guests (issue 12): exhaustion with 64 waiting guests and no lost wakeup,
a guest killed while it waits for a slot, a guest that hoards slots while 16 others keep flowing."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections import Counter

import pytest

import shmhub
from scaleutil import free_counts, proc_state, scale_proto as P, spawn, wait_event

SEED = 4242


def _serve_streams(host, handles, count, lo, hi, deadline, *, on_message=None, tick=None, poll=1.0):
    """recv_any until every guest of `handles` sent `count` data messages (checked: order, length,
    content) and its done; each message is released at once. `on_message(h, msg)` sees every
    message first and returns True if it took it; `tick()` runs before every receive."""
    idx = {h.peer_id: i for i, h in enumerate(handles)}
    want = {i: P.sizes(SEED, i, count, lo, hi) for i in range(len(handles))}
    nxt, done = Counter(), set()
    while len(done) < len(handles):
        rem = deadline - time.monotonic()
        missing = sorted(set(range(len(handles))) - done)
        if rem <= 0:
            raise AssertionError(
                f"guests {missing[:20]} did not finish: at seq {[nxt[i] for i in missing[:20]]} of {count} "
                f"(lost wakeup or starvation); exit codes {[handles[i].returncode for i in missing[:20]]}"
            )
        if tick is not None:
            tick()
        try:
            h, msg = host.recv_any(timeout=min(rem, poll))
        except shmhub.ShmTimeout:
            continue
        if on_message is not None and on_message(h, msg):
            continue
        i = idx[h.peer_id]
        with msg:
            kind = P.header(msg)[0]
            if kind == P.DONE:
                err = P.check(msg, P.DONE, i, count, P.HDR.size) or (None if nxt[i] == count else f"guest {i}: done after {nxt[i]}")
                done.add(i)
            else:
                err = P.check(msg, P.DATA, i, nxt[i], want[i][nxt[i]]) if nxt[i] < count else f"guest {i}: extra message"
                nxt[i] += 1
        assert err is None, err
    return nxt


def _exhaustion(guests: int, count: int, slots: int, timeout: float) -> None:
    """`guests` guests stream slot-tier payloads through one class of `slots` slots to a host that
    frees each by releasing it: the guests block in send for a slot over and over, each woken only
    by the frees of another process."""
    cfg = shmhub.SegmentConfig(max_guests=guests, bipbuf_capacity=16 << 10, size_classes=((1024, slots),))
    lo, hi = cfg.effective_inline_threshold + 1, 1020  # slot tier only
    with shmhub.Host(cfg) as host:
        handles = [spawn(host, "stream", i, count=count, seed=SEED, lo=lo, hi=hi, timeout=timeout) for i in range(guests)]
        t0 = time.monotonic()
        _serve_streams(host, handles, count, lo, hi, t0 + timeout)
        dt = time.monotonic() - t0
        print(
            f"\npool exhaustion: {guests} guests x {count} slot messages through {slots} slots: "
            f"{guests * count / dt:,.0f} msg/s ({dt:.1f} s, spawning included)"
        )
        assert free_counts(host) == [(slots, 0)], "a slot is still allocated after every message was released"
    assert [h.returncode for h in handles] == [0] * guests, [h.returncode for h in handles]


@pytest.mark.timeout(120)
def test_pool_exhaustion_64_guests_no_lost_wakeup():
    _exhaustion(guests=64, count=160, slots=4, timeout=60)  # ~10^4 slot operations


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pool_exhaustion_64_guests_no_lost_wakeup_long():
    _exhaustion(guests=64, count=1600, slots=4, timeout=600)  # ~10^5 slot operations


@pytest.mark.timeout(120)
def test_guest_killed_while_waiting_for_a_slot():
    """A guest blocked in send on an exhausted class is SIGKILLed while the others start streaming
    through that class: the host recovers it, the others flow, and every slot is free afterwards."""
    others, count, slots, size = 4, 300, 8, 900
    cfg = shmhub.SegmentConfig(max_guests=others + 1, bipbuf_capacity=16 << 10, size_classes=((1024, slots),))
    lo, hi = cfg.effective_inline_threshold + 1, 1020
    with shmhub.Host(cfg) as host:
        victim = spawn(host, "victim", others, size=size)  # index `others`: not one of the streams
        handles = [spawn(host, "stream", i, count=count, seed=SEED, lo=lo, hi=hi, timeout=60, go=True) for i in range(others)]
        held = []  # the victim's data messages: never released while the victim lives
        st = {"last": None, "seq": -1, "quiet": 0, "killed": None, "died": None}

        def on_message(h, msg):
            assert h is victim, f"guest {handles.index(h)} sent before its go"
            kind, idx, seq = P.header(msg)
            if kind == P.MARK:
                assert seq == st["seq"] + 1, f"victim mark {seq} after {st['seq']}"
                msg.release()
            else:
                assert seq == st["seq"] and P.check(msg, P.DATA, others, seq, size) is None
                held.append(msg)
            st["last"], st["seq"] = kind, seq

        def blocked() -> bool:
            """The victim's last message is a mark, so it is inside the send of that seq's data; the
            data has not come and the process sleeps: it waits for a slot."""
            if st["last"] != P.MARK or proc_state(victim.pid) != "S":
                return False
            m = victim.link.try_recv()
            if m is not None:
                on_message(victim, m)
                return False
            return True

        # 1. The victim alone: the host holds its data messages until it blocks in send for good.
        deadline = time.monotonic() + 60
        while st["quiet"] < 2:  # blocked at two looks 50 ms apart
            assert time.monotonic() < deadline, f"the victim never blocked in send ({st}, holding {len(held)})"
            try:
                h, msg = host.recv_any(timeout=0.05)
            except shmhub.ShmTimeout:
                st["quiet"] = st["quiet"] + 1 if blocked() else 0
                continue
            on_message(h, msg)
            st["quiet"] = 0
        # 2. The others start streaming through the same class (they wait for slots too unless the
        #    library keeps some from the victim), and the victim dies inside its send.
        for h in handles:
            h.link.send(P.command("go"))
        victim.kill()
        st["killed"] = time.monotonic()

        def look_for_death(wait: float) -> None:
            """Take the host's events (waiting up to `wait` s for one); on the victim's death release
            what the host held of it (only then: its recovery must not depend on the host's frees)."""
            while st["died"] is None:
                try:
                    ev = host.events.get(timeout=wait) if wait else host.events.get_nowait()
                except queue.Empty:
                    assert time.monotonic() - st["killed"] < 10, "no 'died' event within 10 s of the kill"
                    return
                if ev.kind == "died" and ev.peer_id == victim.peer_id:
                    st["died"] = ev
                    for m in held:
                        m.release()

        # 3. Serve the others to the end; the victim's recovery happens meanwhile.
        _serve_streams(host, handles, count, lo, hi, time.monotonic() + 60, tick=lambda: look_for_death(0), poll=0.05)
        while st["died"] is None:
            look_for_death(1.0)
        print(
            f"\nvictim blocked after {st['seq']} sends, holding {len(held)} slots; recovery: {st['died'].reason} "
            f"{st['died'].detail}; the others finished {time.monotonic() - st['killed']:.2f} s after the kill"
        )
        assert free_counts(host) == [(slots, 0)], "slots still allocated after the victim's recovery"
        assert victim.returncode == -9
    assert [h.returncode for h in handles] == [0] * others, [h.returncode for h in handles]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["hold", "stall"])
def test_hoarding_guest_does_not_starve_the_others(mode):
    """One guest takes every slot the host sends it and never gives them back ("hold": receives and
    keeps the Messages; "stall": never reads, its ring full of slot references), while 16 others
    keep doing slot-tier round trips with the host: each of the 16 finishes its round trips."""
    _hoarding(mode, slots=64)


def _hoarding(mode: str, slots: int, feed_limit: int | None = None) -> None:
    """feed_limit: stop feeding the hoarder after that many messages (only to exercise this test's
    own code on a library without quotas)."""
    others, count = 16, 200
    cfg = shmhub.SegmentConfig(max_guests=others + 1, bipbuf_capacity=64 << 10, size_classes=((1024, slots),))
    lo, hi = cfg.effective_inline_threshold + 1, 1020
    with shmhub.Host(cfg) as host:
        kw = {"popen_kwargs": {"stdin": subprocess.PIPE}} if mode == "stall" else {}
        hoarder = spawn(host, f"hoard-{mode}", others, **kw)
        handles = [spawn(host, "roundtrip", i, count=count, seed=SEED, lo=lo, hi=hi, timeout=60) for i in range(others)]
        idx = {h.peer_id: i for i, h in enumerate(handles)}
        stop, saturated = threading.Event(), threading.Event()
        fed = [0, 0, None]  # sent to the hoarder, sends that timed out, another refusal

        def feed():
            """Slot messages to the hoarder until it (or the pool, or its quota) takes no more, and on and on."""
            data = P.make(P.DATA, others, 0, 900)
            while not stop.is_set():
                if feed_limit is not None and fed[0] >= feed_limit:
                    saturated.set()
                    return
                try:
                    hoarder.link.send(data, timeout=0.05)
                    fed[0] += 1
                except shmhub.ShmTimeout:
                    fed[1] += 1
                    saturated.set()
                except (shmhub.PeerDead, shmhub.LinkClosed, shmhub.LinkCorrupted) as e:
                    fed[2] = e
                    saturated.set()
                    return
                except shmhub.ShmhubError as e:  # a refusal other than waiting (a quota error, say): saturated too
                    fed[2] = e
                    saturated.set()
                    stop.wait(0.05)  # pacing the retries, not synchronisation

        feeder = None
        try:
            with hoarder.link.recv(timeout=30) as m:
                assert P.header(m)[:2] == (P.HELLO, others)
            feeder = threading.Thread(target=feed, name="hoard-feeder")
            feeder.start()
            assert saturated.wait(30), "the hoarder never stopped taking slots"
            assert not isinstance(fed[2], (shmhub.PeerDead, shmhub.LinkClosed, shmhub.LinkCorrupted)), f"hoarder link: {fed[2]!r}"
            for h in handles:
                h.link.send(P.command("go"))
            reqs = {i: P.sizes(SEED, i, count, lo, hi) for i in range(others)}
            reps = {i: P.sizes(SEED + 1, i, count, lo, hi) for i in range(others)}
            nxt, done = Counter(), set()
            t0 = time.monotonic()
            deadline = t0 + 20  # ~3200 round trips take well under a second without a hoarder

            def stalled(where: str) -> str:
                return (
                    f"round trips stalled ({where}) with the hoarder holding slots ({fed[0]} sent to it): "
                    f"{others - len(done)} guests unfinished, at {dict(nxt)}; pool (free, allocated) {free_counts(host)}"
                )

            while len(done) < others:
                rem = deadline - time.monotonic()
                assert rem > 0, stalled("no request came")
                try:
                    h, msg = host.recv_any(timeout=min(rem, 1.0))
                except shmhub.ShmTimeout:
                    continue
                i = idx[h.peer_id]
                with msg:
                    kind, _, seq = P.header(msg)
                    if kind == P.DONE:
                        assert seq == count == nxt[i]
                        done.add(i)
                        continue
                    assert P.check(msg, P.DATA, i, nxt[i], reqs[i][nxt[i]]) is None
                reply = P.make(P.DATA, i, seq, reps[i][seq])
                try:
                    h.link.send(reply, timeout=max(0.0, deadline - time.monotonic()))
                except shmhub.ShmTimeout:
                    raise AssertionError(stalled(f"the host's reply to guest {i} found no slot")) from None
                nxt[i] += 1
            print(
                f"\nhoarder ({mode}) was sent {fed[0]} slot messages (then refused: {fed[2]!r}); {others} guests x {count} round trips "
                f"in {time.monotonic() - t0:.2f} s"
            )
        finally:
            stop.set()
            if feeder is not None:
                feeder.join(10)
            if mode == "stall":
                hoarder.process.stdin.close()  # the hoarder leaves; recovery frees what its ring held
            else:
                hoarder.link.send(P.STOP, timeout=10)
        if mode == "hold":
            with hoarder.link.recv(timeout=30) as m:
                kind, _, n = P.header(m)
                assert kind == P.DONE, kind
        else:
            wait_event(host, "exited", hoarder.peer_id, timeout=30)
        assert free_counts(host) == [(slots, 0)], "slots still allocated after the hoarder let go"
    assert [h.returncode for h in handles] == [0] * others, [h.returncode for h in handles]
