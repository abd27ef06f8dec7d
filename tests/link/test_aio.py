"""asyncio support (shmhub.aio) against real guest processes (tests/guests/aio_*.py)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import resource
import subprocess
import sys
import threading
import time

import pytest

import shmhub
import shmhub.host
from shmhub import Host, SegmentConfig, ShmTimeout

GUESTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guests")
_spec = importlib.util.spec_from_file_location("aio_proto", os.path.join(GUESTS, "aio_proto.py"))
proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proto)

T = 30  # upper bound of every wait in these tests; none should come close


def spawn(host: Host, script: str, *args, **kw):
    return host.spawn([sys.executable, os.path.join(GUESTS, script), *map(str, args)], **kw)


def spawn_sink(host: Host):
    return spawn(host, "aio_sink.py", stdin=subprocess.PIPE)


def go(guest) -> None:
    """Let an aio_sink guest start reading."""
    guest.process.stdin.write(b"go\n")
    guest.process.stdin.close()


async def sink_summary(link) -> int:
    await link.asend(b"END", timeout=T)
    with await link.arecv(timeout=T) as msg:
        return int(msg.tobytes())


def assert_idle(link, loop=None, readers=None) -> None:
    """Nothing of a finished wait is left: flags down, doorbell handed back, no reader, no waker."""
    w = link._waiter
    assert link._rx.waiting[1] == 0 and link._tx.waiting[0] == 0  # our sides: consumer of rx, producer of tx
    assert not w.polling and not w.async_poll
    assert not w.wakers and not w._announced
    if loop is not None:
        assert len(loop._selector.get_map()) == readers


class SlowCallbacks(logging.Handler):
    """Collects asyncio debug mode's "Executing <handle> took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Executing "):
            self.messages.append(msg)


@pytest.fixture
def slow_callbacks():
    logger = logging.getLogger("asyncio")
    handler, level = SlowCallbacks(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class RunQueueFreeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock leaves out time its thread lost to other processes.

    Debug mode times every callback with loop.time(). On a machine busy with other work a 100 us
    callback can take well over 10 ms of wall time without the code blocking at all: the kernel
    preempts the thread (run-queue delay) or the hypervisor deschedules its virtual CPU (steal).
    Between two readings this clock advances by the thread's CPU time if the thread did not go to
    sleep in between (no voluntary context switch: it only ran or waited for a CPU), else by the wall
    time minus its run-queue delay (/proc/<tid>/schedstat, field 2), and never by less than the CPU
    time. A callback that sleeps, waits on a lock or a syscall, or computes for 10 ms is still
    reported, as the control callbacks of the test show. Without schedstat it is the monotonic clock."""

    _schedstat = -1

    def __init__(self) -> None:
        super().__init__()
        self._tid = threading.get_native_id()  # the thread that creates the loop runs it
        path = f"/proc/self/task/{self._tid}/schedstat"
        if os.path.exists(path):
            self._schedstat = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self._last = self._sample()
            self._now = self._last[0]

    def _delay(self) -> float:
        return int(os.pread(self._schedstat, 128, 0).split()[1]) * 1e-9

    def _sample(self) -> tuple:
        """(wall, cpu, run-queue delay, voluntary switches), read at one instant: a preemption between
        the delay and the wall readings would put its delay on one side of the interval and its wall
        time on the other (seen: a 50 ms control sleep measured under 10 ms), so read again."""
        for _ in range(100):
            before = self._delay()
            wall, cpu = time.monotonic(), time.thread_time()
            slept = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw  # voluntary context switches
            run_delay = self._delay()
            if run_delay == before:
                break
        return wall, cpu, run_delay, slept

    def time(self) -> float:
        if self._schedstat < 0:
            return time.monotonic()
        if threading.get_native_id() != self._tid:
            return self._now  # the readings would be another thread's
        now = self._sample()
        (wall0, cpu0, delay0, slept0), (wall, cpu, delay, slept) = self._last, now
        ran = cpu - cpu0
        self._now += ran if slept == slept0 else max(ran, (wall - wall0) - (delay - delay0))
        self._last = now
        return self._now

    def close(self) -> None:
        super().close()
        if self._schedstat >= 0:
            os.close(self._schedstat)
            self._schedstat = -1


def run_debug(coro):
    """Run coro in debug mode: every callback or task step of 10 ms or more is logged."""
    loop = RunQueueFreeLoop()
    try:
        loop.set_debug(True)
        loop.slow_callback_duration = 0.01
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class Ticker:
    """A task that sleeps `period` in a loop and records when it ran: proof that the loop is free."""

    def __init__(self, period: float = 0.002) -> None:
        self.period = period
        self.times: list = []
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.times.append(time.monotonic())
            await asyncio.sleep(self.period)

    def ticks_between(self, t0: float, t1: float) -> int:
        return sum(1 for t in self.times if t0 <= t <= t1)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


# -- one task serves many guests ----------------------------------------------------------------


def spin(seconds: float) -> None:
    """Burn CPU for `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


PER_GUEST = 12_500  # 8 guests: 100 000 requests and 100 000 replies
WINDOW = 32


def test_one_task_serves_8_guests_without_blocking_the_loop(slow_callbacks, monkeypatch):
    async def serve(host, guests):
        expected = {g.peer_id: 0 for g in guests}
        served = tiers = 0
        while served < PER_GUEST * len(guests):
            h, msg = await host.arecv_any(timeout=T)
            with msg:
                tiers += msg.tier == "slot"
                data = msg.tobytes()
            proto.check_request(data, h.peer_id, expected[h.peer_id])
            expected[h.peer_id] += 1
            await h.link.asend(proto.reply_to(data), timeout=T)
            served += 1
        during = list(slow_callbacks.messages)
        # The check works: a callback that blocks for 50 ms, and one that spins for 50 ms, are reported.
        loop = asyncio.get_running_loop()
        for block in (lambda: time.sleep(0.05), lambda: spin(0.05)):
            done = loop.create_future()
            loop.call_soon(lambda: (block(), done.set_result(None)))
            await done
        control = slow_callbacks.messages[len(during) :]
        assert len(control) == 2 and all("<lambda>" in m for m in control), control
        return expected, tiers, during

    # Two things outside shmhub.aio would otherwise be timed as loop callbacks: collections of the
    # test process's large heap (pytest, hypothesis: freeze it), and the host monitor's periodic
    # scan (walk-ins, heartbeats; none here) taking the GIL every 50 ms. Guest exits still wake it.
    monkeypatch.setattr(shmhub.host, "MONITOR_TICK", 5.0)
    gc.collect()
    gc.freeze()
    try:
        with Host(SegmentConfig(max_guests=8)) as host:
            guests = [spawn(host, "aio_client.py", PER_GUEST, WINDOW) for _ in range(8)]
            t0 = time.monotonic()
            expected, slot_msgs, during = run_debug(serve(host, guests))
            elapsed = time.monotonic() - t0
            codes = [g.wait(T) for g in guests]
            stats = [g.link.stats for g in guests]
    finally:
        gc.unfreeze()
    assert codes == [0] * 8  # every guest got every reply, checked
    assert expected == {g.peer_id: PER_GUEST for g in guests}
    assert slot_msgs == 8 * (PER_GUEST // 64)  # the slot tier was exercised too
    assert sum(s.sent_inline + s.sent_slot for s in stats) == 8 * PER_GUEST
    assert during == [], f"the loop was blocked while serving ({elapsed:.1f} s): {during}"


# -- an asyncio guest ---------------------------------------------------------------------------


def test_async_guest_serves_with_arecv_asend_and_async_for():
    n = 3000

    async def drive(link):
        await link.asend(b"HELLO", timeout=T)

        async def send_all():
            for seq in range(n):
                await link.asend(proto.request(link.peer_id, seq), timeout=T)

        async def recv_all():
            for seq in range(n):  # this task and send_all share the link's doorbell
                with await link.arecv(timeout=T) as msg:
                    proto.check_reply(msg.tobytes(), link.peer_id, seq)

        await asyncio.gather(send_all(), recv_all())
        return await sink_summary(link)

    with Host() as host:
        g = spawn(host, "aio_async_guest.py")
        served = asyncio.run(drive(g.link))
    assert served == n
    assert g.process.returncode == 0  # its `async for` ended when the host said goodbye


# -- timeouts and cancellation ------------------------------------------------------------------


def test_arecv_timeout_raises_shmtimeout_and_leaves_nothing_behind():
    async def main(link):
        loop = asyncio.get_running_loop()
        readers = len(loop._selector.get_map())
        t0 = time.monotonic()
        with pytest.raises(ShmTimeout) as ei:
            await link.arecv(timeout=0.2)
        elapsed = time.monotonic() - t0
        assert isinstance(ei.value, TimeoutError)
        assert 0.2 <= elapsed < 2.0
        assert_idle(link, loop, readers)
        await link.asend(b"still works", timeout=T)
        with await link.arecv(timeout=T) as msg:
            assert msg.tobytes() == b"still works"

    with Host() as host:
        g = spawn(host, "aio_echo.py")
        asyncio.run(main(g.link))


def test_cancelled_arecv_leaves_the_link_usable():
    async def main(link):
        loop = asyncio.get_running_loop()
        readers = len(loop._selector.get_map())
        task = loop.create_task(link.arecv(timeout=T))
        await asyncio.sleep(0.1)
        assert not task.done()
        # Waiting: the flag is up, asyncio polls the doorbell with one reader.
        assert link._rx.waiting == (0, 1)
        assert link._waiter.polling and link._waiter.async_poll
        assert len(loop._selector.get_map()) == readers + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_idle(link, loop, readers)
        for i in range(3):
            await link.asend(b"after cancel %d" % i, timeout=T)
            with await link.arecv(timeout=T) as msg:
                assert msg.tobytes() == b"after cancel %d" % i

    with Host() as host:
        g = spawn(host, "aio_echo.py")
        asyncio.run(main(g.link))


def test_asend_timeout_on_full_ring_sends_nothing():
    async def main(g):
        link = g.link
        sent = 0
        while link.try_send(proto.sink_msg(sent, 100)):
            sent += 1
        assert sent > 10  # the 4 KiB ring took that many before filling up
        t0 = time.monotonic()
        with pytest.raises(ShmTimeout):
            await link.asend(proto.sink_msg(sent, 100), timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
        assert link.stats.ring_full_waits == 1
        assert_idle(link)
        go(g)
        for _ in range(5):  # now the same message goes through
            await link.asend(proto.sink_msg(sent, 100), timeout=T)
            sent += 1
        return sent, await sink_summary(link)

    with Host(SegmentConfig(bipbuf_capacity=4096)) as host:
        g = spawn_sink(host)
        sent, counted = asyncio.run(main(g))
    assert counted == sent  # the timed-out message was not half-sent
    assert g.process.returncode == 0


def test_cancelled_asend_on_exhausted_pool_holds_no_slot():
    """An asend waiting on an exhausted pool (the futex helper thread) and one waiting at the link's
    slot share (the doorbell): cancelled, each has sent nothing and holds nothing."""
    cfg = SegmentConfig(size_classes=((1024, 8), (4096, 6)))

    async def main(g):
        link, pool = g.link, g.link.segment.pool
        assert link._shares.limit(1) == 4  # 6 slots less SLOT_SHARE_MIN for the guest's direction
        await link.asend(proto.sink_msg(0, 2000), timeout=T)
        others = [pool.alloc_in_class(1, 0) for _ in range(5)]  # held outside any link: exhausted
        assert pool.counts(1) == (0, 6)
        for why in ("exhausted", "share"):
            task = asyncio.get_running_loop().create_task(link.asend(proto.sink_msg(1, 2000), timeout=T))
            await asyncio.sleep(0.1)
            assert not task.done() and link._tx.waiting == (1, 0), why  # the producer announced its wait
            if why == "exhausted":
                assert pool.waiting(1) == 1  # the helper thread sleeps on the futex
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert_idle(link)
            if why == "exhausted":
                for ref in others[:3]:  # the link may take 3 more slots: up to its share of 4
                    pool.free(*ref)
                for seq in range(1, 4):  # sequence 1 again: the cancelled one never reached the ring
                    await link.asend(proto.sink_msg(seq, 2000), timeout=T)
                assert link._shares.held(1) == 4 and pool.counts(1) == (0, 6)
        assert link.stats.slot_exhaustion_waits == 2
        for ref in others[3:]:
            pool.free(*ref)
        go(g)
        for seq in range(4, 8):
            await link.asend(proto.sink_msg(seq, 2000), timeout=T)
        counted = await sink_summary(link)
        # The guest freed every slot it received; none was left allocated by the cancelled sends.
        deadline = time.monotonic() + T
        while pool.counts(1) != (6, 0) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return counted, pool.counts(1)

    with Host(cfg) as host:
        g = spawn_sink(host)
        counted, counts = asyncio.run(main(g))
    assert counted == 8
    assert counts == (6, 0)


def test_cancelled_arecv_any_leaves_every_link_idle():
    """arecv_any waits on the host's one epoll set (one reader, whatever the guest count); the guests'
    consumer flags stay announced by design (recv_any watches them, like fileno()); a cancelled
    wait leaves no reader, no waker and no doorbell taken."""

    async def main(host, guests):
        loop = asyncio.get_running_loop()
        readers = len(loop._selector.get_map())
        task = loop.create_task(host.arecv_any(timeout=T))
        await asyncio.sleep(0.1)
        assert not task.done()
        assert all(g.link._rx.waiting == (0, 1) and not g.link._waiter.polling for g in guests)
        assert len(loop._selector.get_map()) == readers + 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for g in guests:
            w = g.link._waiter
            assert not w.polling and not w.async_poll and not w.wakers and g.link._tx.waiting[0] == 0
        assert len(loop._selector.get_map()) == readers
        await guests[1].link.asend(b"ping", timeout=T)
        h, msg = await host.arecv_any(timeout=T)
        with msg:
            assert (h, msg.tobytes()) == (guests[1], b"ping")

    with Host() as host:
        guests = [spawn(host, "aio_echo.py") for _ in range(3)]
        asyncio.run(main(host, guests))


def test_close_wakes_waiting_tasks_without_deadlock():
    """Threading locks are never held across an await: close() and Host.close() called from the
    loop's own thread while tasks wait complete, and the tasks get the right error."""

    async def main(host, guests):
        loop = asyncio.get_running_loop()
        readers = len(loop._selector.get_map())
        task = loop.create_task(guests[0].link.arecv(timeout=T))
        await asyncio.sleep(0.1)
        guests[0].link.close()
        with pytest.raises(shmhub.LinkClosed):
            await asyncio.wait_for(task, T)
        task = loop.create_task(host.arecv_any(timeout=T))
        await asyncio.sleep(0.1)
        assert not task.done()
        host.close()  # says goodbye, waits for the guests, recovers their links
        with pytest.raises(shmhub.ShmhubError, match="host is closed"):
            await asyncio.wait_for(task, T)
        assert len(loop._selector.get_map()) == readers

    host = Host()
    try:
        guests = [spawn(host, "aio_echo.py") for _ in range(2)]
        asyncio.run(main(host, guests))
    finally:
        host.close()
    assert [g.process.returncode for g in guests] == [0, 0]


# -- the loop stays responsive ------------------------------------------------------------------


def test_loop_keeps_ticking_while_arecv_any_waits():
    async def main(host, guests):
        ticker = Ticker()
        t0 = time.monotonic()
        with pytest.raises(ShmTimeout):
            await host.arecv_any(timeout=0.5)
        t1 = time.monotonic()
        assert t1 - t0 >= 0.5
        # A blocking wait would let the ticker run once at most; 2 ms ticks give ~250.
        assert ticker.ticks_between(t0, t1) >= 25

        async def later():
            await asyncio.sleep(0.2)
            await guests[2].link.asend(b"late", timeout=T)

        t0 = time.monotonic()
        sender = asyncio.get_running_loop().create_task(later())
        h, msg = await host.arecv_any(timeout=T)
        t1 = time.monotonic()
        with msg:
            assert (h, msg.tobytes()) == (guests[2], b"late")
        await sender
        assert t1 - t0 >= 0.2 and ticker.ticks_between(t0, t1) >= 10
        await ticker.stop()

    with Host() as host:
        guests = [spawn(host, "aio_echo.py") for _ in range(3)]
        asyncio.run(main(host, guests))


def test_loop_keeps_ticking_while_asend_waits_on_a_full_ring():
    async def main(g):
        link, loop = g.link, asyncio.get_running_loop()
        ticker = Ticker()
        sent = 0
        while link.try_send(proto.sink_msg(sent, 200)):
            sent += 1
        t0 = time.monotonic()
        task = loop.create_task(link.asend(proto.sink_msg(sent, 200), timeout=T))
        await asyncio.sleep(0.3)
        assert not task.done() and link.stats.ring_full_waits == 1
        assert ticker.ticks_between(t0, time.monotonic()) >= 15
        go(g)
        await asyncio.wait_for(task, T)
        sent += 1
        await ticker.stop()
        return sent, await sink_summary(link)

    with Host(SegmentConfig(bipbuf_capacity=4096)) as host:
        g = spawn_sink(host)
        sent, counted = asyncio.run(main(g))
    assert counted == sent


def test_loop_keeps_ticking_while_asend_waits_on_an_exhausted_pool():
    cfg = SegmentConfig(size_classes=((1024, 8), (4096, 2)))

    async def main(g):
        link, loop = g.link, asyncio.get_running_loop()
        ticker = Ticker()
        for seq in range(2):
            await link.asend(proto.sink_msg(seq, 3000), timeout=T)
        t0 = time.monotonic()
        task = loop.create_task(link.asend(proto.sink_msg(2, 3000), timeout=T))
        await asyncio.sleep(0.3)
        assert not task.done() and link.stats.slot_exhaustion_waits == 1
        assert ticker.ticks_between(t0, time.monotonic()) >= 15
        go(g)  # the guest frees the slots it receives
        await asyncio.wait_for(task, T)
        for seq in range(3, 20):
            await link.asend(proto.sink_msg(seq, 3000), timeout=T)
        await ticker.stop()
        return await sink_summary(link)

    with Host(cfg) as host:
        g = spawn_sink(host)
        counted = asyncio.run(main(g))
    assert counted == 20


def test_loop_keeps_ticking_while_asend_waits_for_a_mapping():
    """Payloads above the largest slot go through mmap mappings; with every mapping leased by the
    (not yet reading) guest, asend waits until the guest releases one."""
    size = (1 << 20) + 4096  # above the largest slot payload of the default config

    async def main(g):
        link, loop = g.link, asyncio.get_running_loop()
        ticker = Ticker()
        cap = link._maps_tx.max_mappings
        for seq in range(cap):
            await link.asend(proto.sink_msg(seq, size), timeout=T)
        assert link.mappings["tx_leases"] == cap
        t0 = time.monotonic()
        task = loop.create_task(link.asend(proto.sink_msg(cap, size), timeout=T))
        await asyncio.sleep(0.3)
        assert not task.done() and link.stats.mapping_waits == 1
        assert ticker.ticks_between(t0, time.monotonic()) >= 15
        go(g)  # the guest releases each payload: its mapping's lease drops
        await asyncio.wait_for(task, T)
        await ticker.stop()
        counted = await sink_summary(link)
        return counted, cap, link.stats.sent_mmap

    with Host() as host:
        g = spawn_sink(host)
        counted, cap, sent_mmap = asyncio.run(main(g))
    assert counted == cap + 1 == sent_mmap


def test_a_task_draining_a_full_ring_lets_other_tasks_run():
    """arecv on a ring full of messages never has to wait, yet yields to the loop every ms or so
    (aio.YIELD_AFTER) so that a busy consumer cannot starve the other tasks."""
    n, payload = 5000, bytes(16)  # 24-byte frames: 120 000 bytes, well inside the 256 KiB ring

    async def main(link):
        for _ in range(n):
            await link.asend(payload, timeout=T)
        deadline = time.monotonic() + T
        while link._rx.indices[0] < n * 24 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # until the guest has echoed everything
        assert link._rx.indices[0] == n * 24
        ticker = Ticker(period=0)
        await asyncio.sleep(0)
        t0, cpu0 = time.monotonic(), time.thread_time()
        for _ in range(n):
            with await link.arecv(timeout=T) as msg:
                assert msg.tobytes() == payload
        cpu = time.thread_time() - cpu0
        ticks = ticker.ticks_between(t0, time.monotonic())
        await ticker.stop()
        return cpu, ticks

    with Host() as host:
        g = spawn(host, "aio_echo.py")
        cpu, ticks = asyncio.run(main(g.link))
    # One tick per yield of the draining task, which runs at most ~1 ms between yields (more often
    # when the machine preempts it). Without yields the ticker would not run at all.
    assert cpu > 0.005 and ticks >= max(2, int(cpu / 0.003))


# -- async iteration ----------------------------------------------------------------------------


async def collect(link):
    """The sink messages of `async for msg in link`, checked in order; their tiers."""
    got = []
    async for msg in link:
        with msg:
            proto.check_sink_msg(msg.tobytes(), len(got))
            got.append(msg.tier)
    return got


def test_async_for_ends_when_the_guest_exits():
    with Host() as host:
        g = spawn(host, "aio_burst.py", 300)
        tiers = asyncio.run(asyncio.wait_for(collect(g.link), T))
        assert g.wait(T) == 0
    assert len(tiers) == 300
    assert tiers.count("slot") == 100


def test_async_for_delivers_what_a_dead_guest_left_while_recovery_holds_the_lock():
    """Recovery marks the link dead, then moves the guest's last frames to the backlog holding the
    rx lock. A receiver that finds the lock busy and the peer dead must look again once the lock is
    free, not end the iteration with those frames undelivered (seen once in CI: 0 of 300)."""
    with Host() as host:
        g = spawn(host, "aio_burst.py", 300)
        link = g.link
        link._rx_lock.acquire()  # what recovery holds while it drains
        try:
            assert g.wait(T) == 0
            link._mark_dead("test: recovery under way")
            threading.Timer(0.05, link._rx_lock.release).start()
            tiers = asyncio.run(asyncio.wait_for(collect(link), T))
        except BaseException:
            if link._rx_lock.locked():
                link._rx_lock.release()
            raise
    assert len(tiers) == 300
    assert tiers.count("slot") == 100


# -- sharing a doorbell with threads (DECISIONS 12, trap 32) ------------------------------------


async def _end_sink(link, receiver) -> int:
    """Tell the aio_sink guest to report; its count answers `receiver`, the very first arecv, which
    waited all along. The link is left idle."""
    await link.asend(b"END", timeout=T)
    with await receiver as msg:
        counted = int(msg.tobytes())
    assert_idle(link)
    return counted


def _run_small_sink(main) -> None:
    """main(guest) against an aio_sink guest on 4 KiB rings; it returns (counted, sent)."""
    with Host(SegmentConfig(bipbuf_capacity=4096)) as host:
        g = spawn_sink(host)
        counted, n = asyncio.run(main(g))
    assert counted == n


def test_thread_waits_on_the_condition_while_asyncio_polls_the_doorbell():
    """asyncio owns the doorbell (arecv waits); a thread's blocking send on a full ring must be woken
    through the waiter's condition when the guest frees ring space and rings."""

    async def main(g):
        link = g.link
        loop = asyncio.get_running_loop()
        receiver = loop.create_task(link.arecv(timeout=T))
        await asyncio.sleep(0.05)
        assert link._waiter.async_poll
        errors, n = [], 400  # far more than the 4 KiB ring holds

        def blocking_sender():
            try:
                for seq in range(n):
                    link.send(proto.sink_msg(seq, 100), timeout=T)
            except BaseException as e:  # reported below
                errors.append(e)

        th = threading.Thread(target=blocking_sender)
        th.start()
        deadline = time.monotonic() + T
        while link.stats.ring_full_waits == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert th.is_alive() and link._waiter.async_poll  # the thread sleeps on the condition
        go(g)
        while th.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        th.join(T)
        assert not errors and not th.is_alive()
        return await _end_sink(link, receiver), n

    _run_small_sink(main)


def test_a_blocking_call_in_the_loop_that_polls_the_doorbell_polls_beside_it():
    """asyncio owns the doorbell (a task awaits arecv), then a coroutine of the same loop makes a
    blocking send on a full ring: the loop cannot run its doorbell reader, so the send must poll
    the doorbell itself (found by the RPC serving loop, whose replies are blocking sends)."""

    async def main(g):
        link = g.link
        receiver = asyncio.get_running_loop().create_task(link.arecv(timeout=T))
        await asyncio.sleep(0.05)
        assert link._waiter.async_poll
        n = 400  # far more than the 4 KiB ring holds
        threading.Timer(0.2, go, (g,)).start()  # the guest drains only once the loop is stuck
        t0 = time.monotonic()
        for seq in range(n):
            link.send(proto.sink_msg(seq, 100), timeout=T)  # blocks the loop while the ring is full
        assert link.stats.ring_full_waits > 0 and time.monotonic() - t0 < T / 2
        return await _end_sink(link, receiver), n

    _run_small_sink(main)


def test_asyncio_rechecks_while_a_thread_polls_the_doorbell():
    """A thread owns the doorbell (blocking recv); asend on a full ring must not compete for the fd
    but still complete when the guest drains the ring."""

    async def main(g):
        link = g.link
        result = []
        th = threading.Thread(target=lambda: result.append(link.recv_bytes(timeout=T)))
        th.start()
        deadline = time.monotonic() + T
        while not link._waiter.polling and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert link._waiter.polling and not link._waiter.async_poll
        sent = 0
        while link.try_send(proto.sink_msg(sent, 100)):
            sent += 1
        task = asyncio.get_running_loop().create_task(link.asend(proto.sink_msg(sent, 100), timeout=T))
        await asyncio.sleep(0.1)
        assert not task.done()
        assert link._waiter.polling and not link._waiter.async_poll  # still the thread's
        go(g)
        await asyncio.wait_for(task, T)
        sent += 1
        for seq in range(sent, sent + 50):
            await link.asend(proto.sink_msg(seq, 100), timeout=T)
        await link.asend(b"END", timeout=T)
        while th.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        th.join(T)
        assert_idle(link)
        return int(result[0]), sent + 50

    with Host(SegmentConfig(bipbuf_capacity=4096)) as host:
        g = spawn_sink(host)
        counted, sent = asyncio.run(main(g))
    assert counted == sent


# -- walk-in guests (no doorbell): iteration ends when the host says goodbye ---------------------


def _walk_in(host: Host, path: str):
    """A walk-in guest link in this process, and the host's handle of it."""
    link = shmhub.Guest.attach(path)
    deadline = time.monotonic() + T
    while not host.guests and time.monotonic() < deadline:
        time.sleep(0.01)  # the host's monitor finds walk-ins by scanning the peer table
    assert [h.peer_id for h in host.guests] == [link.peer_id]
    return link, host.guests[0]


def _iterate_until_goodbye(host: Host, path: str, consume) -> tuple:
    """consume(link, got) runs in a thread; the host sends 3 messages, waits for them, closes."""
    got, errors = [], []
    with host:
        link, h = _walk_in(host, path)

        def run():
            try:
                consume(link, got)
            except BaseException as e:  # reported by the caller
                errors.append(e)
            finally:
                link.close()

        th = threading.Thread(target=run)
        th.start()
        for i in range(3):
            h.link.send(b"m%d" % i, timeout=T)
        deadline = time.monotonic() + T
        while len(got) < 3 and th.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
    th.join(T)  # host.close() said goodbye
    assert not th.is_alive()
    return got, errors


def test_blocking_iteration_ends_when_the_host_says_goodbye(shm_path):
    def consume(link, got):
        for msg in link:
            with msg:
                got.append(msg.tobytes())

    got, errors = _iterate_until_goodbye(Host(path=shm_path), shm_path, consume)
    assert errors == []
    assert got == [b"m0", b"m1", b"m2"]


def test_async_for_on_a_walk_in_guest_ends_when_the_host_says_goodbye(shm_path):
    def consume(link, got):
        async def run():
            async for msg in link:  # no doorbell: waits re-check in short slices
                with msg:
                    got.append(msg.tobytes())

        asyncio.run(asyncio.wait_for(run(), T))

    got, errors = _iterate_until_goodbye(Host(path=shm_path), shm_path, consume)
    assert errors == []
    assert got == [b"m0", b"m1", b"m2"]
