"""A remote link behaves as a shared-memory Link: echo, large payloads, timeouts, asyncio, stats,
close, and a peer's death (killed, stopped, closed) noticed within the heartbeat timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import pytest
from remoteutil import LIVENESS, T, pair_on, start_guest, stop

import shmhub
from shmhub import HostGone, LinkClosed, Message, PeerDead, ShmTimeout
from shmhub.remote import Listener


def test_echo_through_a_guest_process(listener):
    proc = start_guest("echo.py", listener.endpoint, LIVENESS)
    try:
        g = listener.accept(timeout=T)
        assert g.name == "echo" and g.pid == proc.pid and g.address == "127.0.0.1"
        for i in range(50):
            g.link.send(b"ping %d" % i, timeout=T)
            with g.link.recv(timeout=T) as m:
                assert isinstance(m, Message) and m.tier == "tcp"
                assert m.tobytes() == b"ping %d" % i
        g.link.close()
        assert proc.wait(T) == 0  # the guest saw HostGone and ended
    finally:
        stop(proc)


@pytest.mark.parametrize("size", [0, 1, 4096, 65535, 65536, 3 << 20])
def test_payloads_of_every_size_arrive_intact(pair, size):
    host, guest = pair
    data = os.urandom(size)
    host.send(bytearray(data), timeout=T)  # mutable: sent without a copy once it is large
    host.send(memoryview(data), timeout=T)
    assert guest.recv_bytes(timeout=T) == data
    with guest.recv(timeout=T) as m:
        assert len(m) == m.nbytes == size and bytes(m) == data


def test_a_large_payload_is_sent_without_a_copy_and_may_be_reused_after_send(pair):
    host, guest = pair
    buf = bytearray(b"a" * (8 << 20))
    host.send(buf, timeout=T)
    buf[:] = b"b" * len(buf)  # send() returned: the buffer is ours again
    host.send(bytes(buf), timeout=T)
    assert host.stats()["sent_zero_copy"] == 2
    with guest.recv(timeout=T) as m:
        assert bytes(m[:1] if False else memoryview(m)[:4]) == b"aaaa" and len(m) == len(buf)
    with guest.recv(timeout=T) as m:
        assert memoryview(m)[-4:] == b"bbbb"


def test_recv_times_out_and_try_recv_finds_nothing(pair):
    host, guest = pair
    t0 = time.monotonic()
    with pytest.raises(ShmTimeout):
        guest.recv(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    with pytest.raises(TimeoutError):
        host.recv_bytes(timeout=0)
    assert guest.try_recv() is None and guest.try_recv_bytes() is None
    host.send(b"x")
    deadline = time.monotonic() + T
    while (m := guest.try_recv()) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert m is not None and m.tobytes() == b"x"


def test_send_many_and_recv_many(pair):
    host, guest = pair
    assert host.send_many([b"%d" % i for i in range(100)], timeout=T) == 100
    got = []
    while len(got) < 100:
        got += [m.tobytes() for m in guest.recv_many(32, timeout=T)]
    assert got == [b"%d" % i for i in range(100)]
    with pytest.raises(ValueError):
        guest.recv_many(0)


def test_sends_and_receives_from_many_threads_at_once(pair):
    host, guest = pair
    n, threads = 300, 4

    def produce(k):
        for i in range(n):
            host.send(b"%d:%d" % (k, i), timeout=T)

    ts = [threading.Thread(target=produce, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    got = [guest.recv_bytes(timeout=T) for _ in range(n * threads)]
    for t in ts:
        t.join(T)
    for k in range(threads):
        mine = [int(b.split(b":")[1]) for b in got if b.startswith(b"%d:" % k)]
        assert mine == list(range(n))  # each sender's order is kept


def test_a_receiver_asleep_in_another_thread_wakes_for_a_send_made_meanwhile(pair):
    host, guest = pair
    got = []
    t = threading.Thread(target=lambda: got.append(guest.recv_bytes(timeout=T)))
    t.start()
    time.sleep(0.05)
    guest.send(b"from the same end", timeout=T)  # a zmq call in another thread, while it sleeps
    assert host.recv_bytes(timeout=T) == b"from the same end"
    host.send(b"wake", timeout=T)
    t.join(T)
    assert got == [b"wake"]


def test_asyncio_arecv_asend_and_async_for(pair):
    host, guest = pair

    async def main():
        await host.asend(b"one", timeout=T)
        await host.asend(bytes(1 << 20), timeout=T)
        m = await guest.arecv(timeout=T)
        assert m.tobytes() == b"one"
        assert len(await guest.arecv_bytes(timeout=T)) == 1 << 20
        with pytest.raises(ShmTimeout):
            await guest.arecv(timeout=0.1)
        waiter = asyncio.ensure_future(guest.arecv(timeout=T))
        await asyncio.sleep(0.05)
        await host.asend(b"late", timeout=T)
        assert (await asyncio.wait_for(waiter, T)).tobytes() == b"late"
        for i in range(5):
            await host.asend(b"%d" % i)
        host.close()
        return [m.tobytes() async for m in guest]  # ends when the host is gone

    assert asyncio.run(asyncio.wait_for(main(), T)) == [b"0", b"1", b"2", b"3", b"4"]


def test_a_cancelled_arecv_leaves_the_link_usable(pair):
    host, guest = pair

    async def main():
        t = asyncio.ensure_future(guest.arecv())
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        host.send(b"after")
        return (await guest.arecv(timeout=T)).tobytes()

    assert asyncio.run(main()) == b"after"


def test_stats_count_both_directions(pair):
    host, guest = pair
    host.send(b"abc")
    guest.recv(timeout=T).release()
    assert host.stats()["sent"] == 1 and host.stats()["sent_bytes"] == 3
    assert guest.stats.as_dict()["recv"] == 1 and guest.stats()["recv_bytes"] == 3


def test_close_wakes_a_blocked_receiver_with_link_closed_and_tells_the_peer(pair):
    host, guest = pair
    errors = []

    def wait():
        try:
            host.recv(timeout=T)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.05)
    guest.send(b"last words")
    host.close()
    t.join(T)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], (LinkClosed,)) or errors == []
    with pytest.raises(LinkClosed):
        host.send(b"x")
    with pytest.raises(HostGone):  # the guest got the host's BYE
        guest.recv(timeout=T)
    assert not guest.alive and not host.alive
    host.close()  # idempotent


def test_frames_sent_before_a_close_are_delivered_before_peer_dead(pair):
    host, guest = pair
    for i in range(20):
        guest.send(b"%d" % i)
    guest.close()
    assert [host.recv_bytes(timeout=T) for _ in range(20)] == [b"%d" % i for i in range(20)]
    with pytest.raises(PeerDead):
        host.recv(timeout=T)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_guest_killed_or_stopped_is_peer_dead_within_the_heartbeat_timeout(listener, how):
    """SIGKILL: the kernel closes its socket; SIGSTOP: the connection stays open, heartbeats stop."""
    proc = start_guest("echo.py", listener.endpoint, LIVENESS)
    try:
        g = listener.accept(timeout=T)
        g.link.send(b"hi", timeout=T)
        assert g.link.recv_bytes(timeout=T) == b"hi"
        os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(PeerDead):
            g.link.recv(timeout=T)
        took = time.monotonic() - t0
        assert took < LIVENESS + 1.0
        if how == "stop":
            assert took > LIVENESS * 0.5  # noticed by the heartbeat timeout, not before
        with pytest.raises(PeerDead):
            g.link.send(b"x", timeout=T)
        assert not g.alive
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)


def test_a_guest_sees_host_gone_when_the_host_process_closes_its_listener():
    lis = Listener("tcp://127.0.0.1:0", liveness=LIVENESS)
    try:
        g, link = pair_on(lis)
    finally:
        lis.close()  # closes the guests' links: they get a BYE
    with pytest.raises(HostGone):
        link.recv(timeout=T)
    with pytest.raises(LinkClosed):
        g.link.recv(timeout=0)
    link.close()


def test_a_welcomed_guest_that_never_connects_is_dead_after_the_grace(listener, monkeypatch):
    import shmhub.remote._listen as L

    monkeypatch.setattr(L, "CONNECT_GRACE", 0.3)
    link = shmhub.connect(listener.endpoint, timeout=T)
    g = listener.accept(timeout=T)
    link.close()
    with pytest.raises(PeerDead):
        g.link.recv(timeout=T)


def test_connect_without_a_listener_fails_in_time():
    from shmhub.remote._listen import Listener as _L

    lis = _L("tcp://127.0.0.1:0")
    url = lis.endpoint
    lis.close()
    t0 = time.monotonic()
    with pytest.raises(shmhub.BootstrapError):
        shmhub.connect(url, timeout=0.3)
    assert time.monotonic() - t0 < 3


def test_host_listen_tcp_returns_the_listener_and_host_close_ends_its_guests():
    with shmhub.Host() as host:
        lis = host.listen("tcp://127.0.0.1:0", liveness=LIVENESS)
        with pytest.raises(shmhub.ShmhubError):
            host.listen("tcp://127.0.0.1:0")
        g, link = pair_on(lis)
        link.send(b"hello")
        assert g.link.recv_bytes(timeout=T) == b"hello"
        assert lis.guests() == [g]
    with pytest.raises(HostGone):
        link.recv(timeout=T)
    link.close()


def test_a_listener_without_keys_refuses_a_non_loopback_address():
    with pytest.raises(shmhub.ConfigError, match="CURVE"):
        Listener("tcp://0.0.0.0:0")
    with pytest.raises(shmhub.ConfigError):
        Listener("udp://127.0.0.1:0")


def test_many_tasks_of_one_loop_wait_on_one_link_at_once(pair):
    host, guest = pair

    async def main():
        readers = [asyncio.ensure_future(guest.arecv_bytes(timeout=T)) for _ in range(3)]
        await asyncio.sleep(0.05)
        for i in range(3):
            await host.asend(b"%d" % i, timeout=T)
        got = await asyncio.wait_for(asyncio.gather(*readers), T)
        assert not guest._aio  # the last waiter took the loop's readers away
        return sorted(got)

    assert asyncio.run(main()) == [b"0", b"1", b"2"]


def test_an_ipv6_loopback_listener():
    import zmq

    try:
        lis = Listener("tcp://[::1]:0", liveness=LIVENESS)
    except zmq.ZMQError:
        pytest.skip("no IPv6 loopback here")
    try:
        g, link = pair_on(lis)
        link.send(b"six")
        assert g.link.recv_bytes(timeout=T) == b"six" and g.address == "::1"
        link.close()
    finally:
        lis.close()


def test_alive_turns_false_for_an_idle_link_whose_guest_died(listener):
    proc = start_guest("echo.py", listener.endpoint, LIVENESS)
    try:
        g = listener.accept(timeout=T)
        g.link.send(b"hi", timeout=T)
        assert g.link.recv_bytes(timeout=T) == b"hi" and g.alive and listener.guests() == [g]
        proc.kill()
        t0 = time.monotonic()
        while g.alive:  # nobody reads the link: alive itself looks at its monitor
            assert time.monotonic() - t0 < LIVENESS + 1.0
            time.sleep(0.01)
        assert listener.guests() == []
    finally:
        stop(proc)


def test_a_link_left_to_the_collector_warns_and_is_closed(listener):
    import gc

    g, link = pair_on(listener)
    with pytest.warns(ResourceWarning, match="unclosed <shmhub.RemoteLink guest"):
        del link
        gc.collect()
    with pytest.raises(PeerDead):  # the collector's close said goodbye
        g.link.recv(timeout=T)


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_guest_sees_host_gone_when_the_host_process_is_killed_or_stopped(how):
    import subprocess
    import sys

    from remoteutil import GUESTS

    proc = subprocess.Popen([sys.executable, os.path.join(GUESTS, "listener.py"), str(LIVENESS)], stdout=subprocess.PIPE)
    try:
        link = shmhub.connect(proc.stdout.readline().decode().strip(), timeout=T, liveness=LIVENESS)
        try:
            assert link.recv_bytes(timeout=T) == b"ready"
            os.kill(proc.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            t0 = time.monotonic()
            with pytest.raises(HostGone):
                link.recv(timeout=T)
            assert time.monotonic() - t0 < LIVENESS + 1.0
        finally:
            link.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        stop(proc)
        proc.stdout.close()
