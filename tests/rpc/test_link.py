"""The RPC drivers over real links to spawned guests: both directions at once, peer death with
calls in flight, out-of-band buffers through slots and mappings, and what shared memory is left."""

from __future__ import annotations

import asyncio
import contextlib
import concurrent.futures as cf
import gc
import os
import random
import sys
import time
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import pytest

import shmhub
from shmhub import Host, SegmentConfig, rpc
from shmhub.errors import PeerDead

HERE = os.path.dirname(os.path.abspath(__file__))
T = 10.0
# Small pools, so that a leaked slot shows, and the mmap tier from 256 KiB up.
CFG = SegmentConfig(max_guests=2, bipbuf_capacity=64 * 1024, size_classes=((1024, 64), (16 * 1024, 32), (256 * 1024, 128)))


def spawn(host: Host, script: str = "rpc_server.py", *args: object) -> shmhub.GuestHandle:
    return host.spawn([sys.executable, os.path.join(HERE, "guests", script), *map(str, args)])


@contextlib.contextmanager
def served(*args: object, client: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[Host, shmhub.GuestHandle, rpc.Client]]:
    """A host, one guest serving the test handlers (tests/rpc/guests/rpc_server.py ARGS) and a
    Client of it. On leaving, the host says goodbye, the guest exits and the client closes."""
    with Host(CFG) as host:
        g = spawn(host, "rpc_server.py", *args)
        c = rpc.Client(g.link, **(client or {}))
        try:
            yield host, g, c
        finally:
            host.close()
            g.wait(T)
            c.close()


def allocated(host: Host) -> list:
    pool = host.segment.pool
    return [pool.counts(c)[1] for c in range(pool.num_classes)]


def wait_for(pred, what: str, timeout: float = T) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.002)


def test_calls_streams_and_asyncio_over_a_link():
    with served() as (host, g, c):
        assert c.call("add", 2, 3, timeout=T) == 5
        assert c.call("pid", timeout=T) == g.pid
        assert list(c.stream("count", 200, timeout=T)) == list(range(200))

        async def go():
            vals = await asyncio.gather(*(c.acall("add", i, i, timeout=T) for i in range(100)))
            items = [x async for x in c.stream("acount", 50, timeout=T)]
            return vals, items

        vals, items = asyncio.run(go())
        assert vals == [2 * i for i in range(100)] and items == list(range(50))
        with pytest.raises(rpc.MethodNotFound, match="'nope'"):
            c.call("nope", timeout=T)
    assert g.wait(T) == 0  # serve() returned when the host said goodbye


def test_both_ends_serve_and_call_over_one_link():
    with Host(CFG) as host:
        g = spawn(host, "rpc_peer.py")
        server = rpc.Server({"host_double": lambda x: 2 * x})
        server.attach(g.link)
        c = rpc.Client(g.link)
        try:
            # host -> guest "callback" -> host "host_double" -> back: nested calls, both directions
            futs = [c.submit("callback", i, timeout=T) for i in range(64)]
            assert [f.result(T) for f in futs] == [2 * i + 1 for i in range(64)]
        finally:
            host.close()
            assert g.wait(T) == 0
            c.close()
            server.close()


def test_server_killed_with_32_calls_in_flight_fails_them_all_with_peer_dead():
    with Host(CFG) as host:
        g = spawn(host, "rpc_server.py", 32)
        c = rpc.Client(g.link)
        try:
            assert c.call("add", 1, 1, timeout=T) == 2
            futs = [c.submit("spin_until_cancelled", f"k{i}", 30.0) for i in range(32)]
            for i in range(32):  # all 32 are running in the guest (wait_event is async: it needs no pool thread)
                assert c.call("wait_event", f"k{i}:started", T, timeout=T) is True
            t0 = time.monotonic()
            g.kill()
            done, not_done = cf.wait(futs, T)
            elapsed = time.monotonic() - t0
            assert not not_done
            assert all(isinstance(f.exception(), PeerDead) for f in futs)
            # Issue 13: within 100 ms (the link's detection bound, tests/link/test_crash.py); about 5 ms here.
            assert elapsed < 0.1, f"calls failed {elapsed * 1e3:.0f} ms after the kill"
            t1 = time.monotonic()
            with pytest.raises(PeerDead):
                c.call("add", 1, 1, timeout=T)  # later calls fail at once
            assert time.monotonic() - t1 < 0.1
            g.wait(T)
            wait_for(lambda: allocated(host) == [0, 0, 0], "every slot free after recovery")
        finally:
            c.close()


def test_out_of_band_buffers_both_ways_leave_every_slot_and_lease_free():
    rng = random.Random(2024)
    with served() as (host, g, c):
        kept = []
        sizes = [64 << 10, 100 << 10, 200 << 10, 300 << 10, 1 << 20]  # slot tier, then the mmap tier
        # Bounded so that the mmap-tier buffers held at once (kept, hoarded, in flight) stay
        # under the link's 16 mappings a direction: beyond that a sender waits for one.
        for round_ in range(60):
            futs = []
            for i in range(8):
                n = rng.choice(sizes) // 8
                a = np.full(n, float(round_ * 100 + i))
                futs.append((a, c.submit("echo", a, timeout=T)))
                if rng.random() < 0.3:  # and arrays made by the guest
                    futs.append((np.full(n, 7.0), c.submit("make_array", n, 7.0, timeout=T)))
                if rng.random() < 0.5:  # the guest keeps some of what it receives, and drops some
                    drop = [rng.randrange(6) for _ in range(rng.randrange(3))]
                    c.submit("hoard", np.ones(rng.choice(sizes) // 8), rng.random() < 0.4, drop, timeout=T)
            for a, f in futs:
                r = f.result(T)
                assert r.shape == a.shape and r[0] == a[0] and r[-1] == a[-1] and not r.flags.writeable
                if rng.random() < 0.2:
                    kept.append(r)  # a view of shared memory, kept for a while
                del r
            if len(kept) > 6:
                for _ in range(len(kept) // 2):
                    kept.pop(rng.randrange(len(kept)))
        assert kept and allocated(host) != [0, 0, 0]  # the kept views hold their slots
        assert c.call("drop_hoard", timeout=T) == 0
        kept.clear()
        del futs, a, f  # the last round's futures hold their results
        gc.collect()
        assert c.call("add", 0, 0, timeout=T) == 0  # the guest's reader is past every frame
        wait_for(lambda: allocated(host) == [0, 0, 0], "every slot free")
        m = g.link.mappings
        wait_for(lambda: g.link.mappings["tx_leases"] == 0, "every mapping lease returned")
        assert m["tx_created"] >= 1  # the mmap tier was used


def test_array_from_link_empty_is_sent_without_a_copy():
    from shmhub.codec import _reserved_owner

    with served() as (host, g, c):
        a = g.link.empty(150_000)  # 1.2 MB: the mmap tier
        a[:] = 2.0
        buf = _reserved_owner(a)
        assert buf is not None and buf.token is not None
        sent_before = g.link.stats.sent_bytes_mmap
        shape, total, writeable, is_view = c.call("array_info", a, timeout=T)
        assert shape == (150_000,) and total == 300_000.0 and not writeable and is_view
        assert buf.token is None  # the reserved buffer itself went out (send_reserved): no copy
        assert g.link.stats.sent_bytes_mmap - sent_before >= a.nbytes
        del a, buf


def test_a_client_makes_its_fds_when_it_is_made():
    """The reader thread's first sleep on the link needs the link's wake eventfd: made by Client(),
    so fd exhaustion is the caller's error, and a long-lived client opens no fd later."""
    with served(4) as (host, g, c):
        before = set(os.listdir("/proc/self/fd"))
        futs = [c.submit("sleep_echo", i, 0.05) for i in range(4)]  # the reader thread sleeps meanwhile
        assert c.call("sleep_echo", "x", 0.05, timeout=T) == "x"
        assert [f.result(T) for f in futs] == list(range(4))
        assert set(os.listdir("/proc/self/fd")) == before


def test_a_returned_argument_comes_back_by_reference():
    """A handler that returns (part of) its argument sends it back by reference (FEATURE_MMAP_RETURN,
    Link.lend): the caller gets a view of its own memory, no copy either way for link.empty()."""
    with served(4) as (host, g, c):
        n = 1 << 17  # 1 MiB of float64: the mmap tier
        a = g.link.empty(n)
        a[:] = np.arange(n)
        r = c.call("echo", a, timeout=T)
        assert r.__array_interface__["data"][0] == a.__array_interface__["data"][0]
        assert np.array_equal(r, np.arange(n))
        del a, r
        private = np.arange(n, dtype=np.float64)
        sent = g.link.stats.sent_bytes_mmap
        r = c.call("echo", private, timeout=T)  # copied into a mapping on the way there, lent back
        assert g.link.stats.sent_bytes_mmap - sent == private.nbytes
        at = r.__array_interface__["data"][0]
        assert any(m.region.address <= at < m.region.address + m.size for m in g.link._maps_tx.maps)
        assert np.array_equal(r, private) and g.link.mappings["tx_leases"] >= 1
        del r
        wait_for(lambda: g.link.mappings["tx_leases"] == 0, "every lease given back")


def test_bytes_codec_over_a_link():
    with served(4, "bytes", client=dict(codec="bytes")) as (host, g, c):
        assert c.call("echo", b"abc", timeout=T) == b"abc"
        big = bytes(range(256)) * 1024
        r = c.call("echo", big, timeout=T)
        assert isinstance(r, memoryview) and r == big
        del r
        with pytest.raises(rpc.RemoteError, match="bytes-like objects, not int"):
            c.call("nbytes", big, timeout=T)  # an int result: the bytes codec refuses it, not pickle


def test_a_caller_killed_mid_call_leaves_the_server_running_and_no_memory_held():
    import threading

    release = threading.Event()
    ready = threading.Event()
    started = []

    def big(i):
        started.append(i)
        release.wait(T)  # the caller is killed meanwhile
        return np.full(100_000 if i % 2 else 20_000, float(i))  # mmap tier and slot tier results

    with Host(CFG) as host:
        g = spawn(host, "rpc_caller.py", 8)
        server = rpc.Server({"big": big, "ready": rpc.inline(lambda: ready.set())}, max_concurrency=8)
        conn = server.attach(g.link)
        try:
            assert ready.wait(T)
            wait_for(lambda: len(started) == 8, "all 8 calls running")
            g.kill()
            g.wait(T)
            release.set()  # the handlers now answer a dead caller
            assert conn.done.wait(T) and isinstance(conn.error, PeerDead)
            server._pool.shutdown(wait=True)  # every handler has returned and tried to send its result
            wait_for(lambda: allocated(host) == [0, 0, 0], "every slot free")
        finally:
            server.close()


def test_a_guests_calls_fail_with_host_gone_when_the_host_goes():
    import subprocess
    import threading

    ready = threading.Event()
    release = threading.Event()
    host = Host(CFG)
    try:
        g = host.spawn([sys.executable, os.path.join(HERE, "guests", "rpc_orphan.py")], stdout=subprocess.PIPE, text=True)
        server = rpc.Server({"stall": lambda: release.wait(T), "ready": rpc.inline(lambda: ready.set())}, max_concurrency=8)
        server.attach(g.link)
        assert ready.wait(T)
        t_close = time.monotonic_ns()
        host.close()  # says goodbye: the guest's 8 calls in flight must fail at once
        out, _ = g.process.communicate(timeout=T)
        done, pending, kinds, later, t_end = out.split()
        assert (done, pending, kinds, later) == ("8", "0", "HostGone", "HostGone"), out
        assert (int(t_end) - t_close) / 1e9 < 1.0
    finally:
        release.set()
        host.close()
        server.close()


def test_a_call_past_its_deadline_leaves_no_shared_memory_held():
    with served(1) as (host, g, c):  # one handler thread: calls run one after another
        a = np.ones(20_000)  # 160 KB: a slot of the 256 KiB class, each way
        t0 = time.monotonic()
        with pytest.raises(rpc.DeadlineExceeded):
            c.call("sleep_echo", a, 0.3, timeout=0.05)
        assert time.monotonic() - t0 < 0.25  # raised at the deadline, not when the handler returned
        # Runs after the late call has finished (one handler thread); the caller's CANCEL made
        # the server drop its result (or, had it raced ahead, the caller drops the late reply).
        assert c.call("add", 1, 1, timeout=T) == 2
        wait_for(lambda: allocated(host) == [0, 0, 0], "no slot held for the expired call")


def test_many_threads_calling_at_once_share_the_read_role():
    """Blocked callers read for each other and hand the read role on (to another caller or the
    reader thread): every call gets its own result, nothing stalls."""
    import threading

    with Host(CFG) as host:
        g = spawn(host)
        c = rpc.Client(g.link, max_in_flight=16)
        errors = []

        def worker(k: int) -> None:
            try:
                for i in range(150):
                    if i % 3 == 0:
                        f = c.submit("add", k, i, timeout=T)  # a call nobody blocks on, read by someone else
                        assert f.result(T) == k + i
                    else:
                        assert c.call("sleep_echo" if i % 7 == 0 else "add", *((k * 1000 + i, 0.001) if i % 7 == 0 else (k, i)), timeout=T) == (
                            k * 1000 + i if i % 7 == 0 else k + i
                        )
            except BaseException as e:  # reported below
                errors.append(e)

        try:
            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            assert not errors, errors[:3]
            assert c._conn.limiter.free == 16
        finally:
            host.close()
            g.wait(T)
            c.close()


def test_a_guest_in_rpc_serve_says_goodbye_when_the_host_leaves():
    """rpc.serve closes its link when it returns, so the host reports the guest exited, not died."""
    host = Host(CFG)
    try:
        g = host.spawn([sys.executable, "-c", "import shmhub\nfrom shmhub import rpc\nrpc.serve(shmhub.connect(), {'add': lambda a, b: a + b})"])
        c = rpc.Client(g.link)
        assert c.call("add", 1, 2, timeout=T) == 3
    finally:
        host.close()
    kinds = []
    while not host.events.empty():
        kinds.append(host.events.get_nowait().kind)
    assert kinds == ["spawned", "exited"]


def test_an_event_loop_reads_its_own_responses_and_hands_the_role_back():
    """acall on a pure client: the loop thread holds the read role while its call is out (no reader
    thread hand-off); cancelling the task, a deadline or a dead peer release it, and threads calling
    meanwhile are answered."""
    import threading

    with served() as (host, g, c):
        conn = c._conn
        free = conn.limiter.free

        async def go():
            me = threading.current_thread()
            task = asyncio.ensure_future(c.acall("sleep_echo", "slow", 0.3, timeout=T))
            await asyncio.sleep(0)  # the task sent its call and holds the role, awaiting the doorbell
            assert conn.role is me
            # A thread's call meanwhile is read by the loop too, and answered.
            fut = asyncio.get_running_loop().run_in_executor(None, lambda: c.call("add", 1, 2, timeout=T))
            assert await asyncio.wait_for(fut, T) == 3
            assert await task == "slow"
            assert conn.role is not me
            # Cancelled while reading: the call is cancelled at the server, the role released.
            task = asyncio.ensure_future(c.acall("await_until_cancelled", "loop", 5.0))
            await asyncio.sleep(0.05)
            assert conn.role is me
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn.role is not me
            assert await c.acall("wait_event", "loop", T, timeout=T) == "CancelledError"
            # A deadline passing while the loop reads.
            t0 = time.monotonic()
            with pytest.raises(rpc.DeadlineExceeded):
                await c.acall("sleep_echo", 1, 5.0, timeout=0.1)
            assert time.monotonic() - t0 < 2.0
            assert conn.role is not me
            return await asyncio.gather(*(c.acall("add", i, 1, timeout=T) for i in range(50)))

        assert asyncio.run(go()) == [i + 1 for i in range(50)]
        assert c.call("add", 2, 2, timeout=T) == 4  # a sync caller after the loop is gone

        async def killed():
            task = asyncio.ensure_future(c.acall("sleep_echo", "never", 30.0, timeout=T))
            await asyncio.sleep(0.05)
            assert conn.role is threading.current_thread()
            g.kill()
            with pytest.raises(PeerDead):
                await asyncio.wait_for(task, T)

        asyncio.run(killed())
        assert conn.limiter.free == free  # every permit back


def test_concurrent_acalls_of_one_loop_are_all_read_by_that_loop():
    """Many acalls at once from one loop: the first reads, the others wait for it, and when it is
    answered a reader task of the loop reads on for them. Every response is read in the loop's
    thread (none handed over by the reader thread), and the role goes back once all are answered."""
    import threading

    with served() as (host, g, c):
        conn = c._conn
        readers = []
        dispatch = conn._dispatch

        def recording(inc):
            readers.append(threading.current_thread())
            dispatch(inc)

        conn._dispatch = recording

        async def go():
            rnd = random.Random(7)
            out = await asyncio.gather(*(c.acall("sleep_echo", i, rnd.random() * 0.002, timeout=T) for i in range(200)))
            return out, threading.current_thread()

        out, me = asyncio.run(go())
        assert out == list(range(200))
        assert len(readers) == 200 and set(readers) == {me}
        assert conn.role is None and conn._loop_reader is None and conn._loop_waiting == 0
        assert c.call("add", 1, 2, timeout=T) == 3


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_loops_acalls_resolve_once_amid_cancels_deadlines_and_thread_calls(seed):
    """The loop's reader (a leading acall, then its reader task) under churn: acalls cancelled at
    random moments (the leader among them), some past their deadline, a thread calling meanwhile.
    Each call resolves exactly once with its own result or its own error; afterwards the role is
    free, no reader task is left and every in-flight permit is back."""
    import threading

    with served() as (host, g, c):
        conn = c._conn
        free = conn.limiter.free
        rnd = random.Random(seed)
        thread_out = []

        def caller():
            for i in range(60):
                thread_out.append(c.call("add", i, 1000, timeout=T))

        async def go():
            th = threading.Thread(target=caller)
            th.start()
            tasks, expect = [], []
            for i in range(150):
                delay = rnd.choice([0.0, 0.0005, 0.002, 0.01])
                if rnd.random() < 0.15:
                    tasks.append(asyncio.ensure_future(c.acall("asleep_echo", i, 0.5, timeout=0.02)))
                    expect.append("deadline")
                else:
                    tasks.append(asyncio.ensure_future(c.acall("asleep_echo", i, delay, timeout=T)))
                    expect.append(i)
                if rnd.random() < 0.3:
                    await asyncio.sleep(rnd.random() * 0.002)
                if rnd.random() < 0.1:
                    victim = rnd.randrange(len(tasks))
                    if tasks[victim].cancel():
                        expect[victim] = "cancelled"
            got = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), T)
            await asyncio.get_running_loop().run_in_executor(None, th.join, T)
            return got, expect

        got, expect = asyncio.run(go())
        for g_, e in zip(got, expect):
            if e == "cancelled":
                assert isinstance(g_, asyncio.CancelledError)
            elif e == "deadline":
                assert isinstance(g_, rpc.DeadlineExceeded), g_
            else:
                assert g_ == e
        assert thread_out == [i + 1000 for i in range(60)]
        assert conn.role is None and conn._loop_reader is None and conn._loop_waiting == 0
        wait_for(lambda: conn.limiter.free == free and len(conn.calls) == 0, "every permit back")
        assert c.call("add", 1, 1, timeout=T) == 2


def test_a_dead_server_fails_every_acall_waiting_on_the_loops_reader():
    with served() as (host, g, c):
        conn = c._conn

        async def go():
            first = asyncio.ensure_future(c.acall("asleep_echo", "quick", 0.0, timeout=T))
            rest = [asyncio.ensure_future(c.acall("asleep_echo", i, 30.0, timeout=T)) for i in range(20)]
            assert await first == "quick"  # the leader is answered: a reader task reads for the rest
            await asyncio.sleep(0.05)
            assert conn._loop_reader is not None
            g.kill()
            return await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), T)

        got = asyncio.run(go())
        assert all(isinstance(e, PeerDead) for e in got), got
        assert conn.role is None and conn._loop_reader is None and conn._loop_waiting == 0


def test_deadlines_do_not_wake_the_timer_thread_per_call():
    """Calls with deadlines later than the one the timer sleeps until leave it asleep, and the
    heap of deadlines of calls already answered stays bounded by the calls pending."""
    with served() as (host, g, c):
        conn = c._conn
        assert c.call("add", 1, 2, timeout=T) == 3  # starts the timer thread
        wakes = []

        class Counting(type(conn._timer_cond)):  # type: ignore[misc]
            def notify(self, n=1):
                wakes.append(n)
                super().notify(n)

        with conn.lock:
            old, conn._timer_cond = conn._timer_cond, Counting(conn.lock)
            old.notify()  # the timer wakes and sleeps on the counting condition from now on
        for i in range(3000):
            assert c.call("add", i, 1, timeout=T) == i + 1
        assert len(wakes) <= 3, f"{len(wakes)} timer wake-ups for 3000 calls"
        assert len(conn.calls._deadlines) <= 2 * len(conn.calls) + 65
        f = c.submit("sleep_echo", 1, 5.0, timeout=0.1)
        with pytest.raises(rpc.DeadlineExceeded):  # an earlier deadline still wakes the timer
            f.result(T)


def test_rpc_serve_runs_async_handlers_in_the_loop_that_reads_the_link():
    """rpc.serve in a guest: its main thread's event loop reads the link and runs async handlers
    (no reader thread hands them over); sync handlers still run in the pool, alongside."""
    with served() as (host, g, c):
        assert c.call("where_async", timeout=T) is True
        slow = c.submit("sleep_echo", "pool", 0.3, timeout=T)  # a pool thread sleeps meanwhile
        assert [c.call("asleep_echo", i, 0.0, timeout=T) for i in range(20)] == list(range(20))
        assert slow.result(T) == "pool"
    assert g.wait(T) == 0  # serve() returned when the host said goodbye: a clean exit


def test_closing_a_stream_frees_the_shared_memory_of_items_not_taken():
    with served() as (host, g, c):
        s = c.stream("blobs", 8, 100_000, timeout=T)
        first = next(iter(s))
        assert len(first) == 100_000
        wait_for(lambda: len(s._st.items) == 7, "the other 7 items buffered")
        assert allocated(host)[2] == 8
        s.close()
        del first
        wait_for(lambda: allocated(host) == [0, 0, 0], "every slot free once the stream is closed")
        assert c.call("add", 1, 1, timeout=T) == 2


def test_the_serving_loop_reads_on_while_a_reply_waits_for_a_slot():
    """Async handlers reply from the loop that reads the link: a reply that must wait for shared
    memory (here the host holds the guest's whole share of the 256 KiB class, unread) waits in a
    thread, and the loop goes on answering other calls."""
    with served() as (host, g, c):
        streams = [c.stream("ablobs", rpc._server.STREAM_WINDOW, 200_000, timeout=T) for _ in range(5)]
        # 5 x 32 items of 200 kB: more than the guest's share of the 128 slots.
        wait_for(lambda: sum(len(s._st.items) for s in streams) >= 100, "the guest's share nearly used")
        time.sleep(0.2)  # the last items wait for slots in the guest
        assert sum(len(s._st.items) for s in streams) < 5 * rpc._server.STREAM_WINDOW
        assert c.call("add", 2, 3, timeout=T) == 5
        got = [sum(1 for _ in s) for s in streams]  # taking the items frees their slots
        assert got == [rpc._server.STREAM_WINDOW] * 5
        wait_for(lambda: allocated(host) == [0, 0, 0], "every slot free")
