"""The drivers over an in-memory channel pair (no shared memory): calls, streams, asyncio,
ordering, deadlines, cancellation, limits, errors, the connection's end and malformed input."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import random
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shmhub.errors import LinkClosed, PeerDead, RpcProtocolError, ShmTimeout
from shmhub import rpc
from shmhub.rpc import _wire as W

import handlers as H
from handlers import Boom
from memchannel import MemoryChannel, channel_pair

T = 10.0  # a bound on anything that should happen at once; tests normally take milliseconds


class Pair:
    def __init__(self, max_concurrency: int = 32, max_in_flight: int = 64, handlers=None, codec=None) -> None:
        self.a, self.b = channel_pair()
        self.server = rpc.Server(handlers if handlers is not None else H.HANDLERS, max_concurrency=max_concurrency, codec=codec)
        self.conn = self.server.attach(self.b)
        self.client = rpc.Client(self.a, max_in_flight=max_in_flight, codec=codec)

    def close(self) -> None:
        self.client.close()
        self.b.close()
        self.server.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_call_submit_acall_stream_and_dotted_methods(pair):
    c = pair.client
    assert c.call("add", 1, 2, timeout=T) == 3
    assert c.call("add", a="x", b="y", timeout=T) == "xy"
    assert c.submit("add", 2, 3, timeout=T).result(T) == 5
    assert asyncio.run(c.acall("asleep_echo", "hi", 0.001, timeout=T)) == "hi"
    assert list(c.stream("count", 100, timeout=T)) == list(range(100))
    assert c.call("model.predict", 5, timeout=T) == 15

    async def astream():
        return [x async for x in c.stream("acount", 70, timeout=T)]

    assert asyncio.run(astream()) == list(range(70))


def test_unknown_method_names_it(pair):
    for name in ("nope", "model._private", "model.nope", "add.__class__"):
        with pytest.raises(rpc.MethodNotFound, match=repr(name).replace(".", r"\.")):
            pair.client.call(name, timeout=T)
    assert pair.client.call("add", 1, 1, timeout=T) == 2  # the connection is fine after


def test_remote_exceptions(pair):
    with pytest.raises(Boom, match="kaboom") as ei:
        pair.client.call("boom", "kaboom", timeout=T)
    assert "def boom" in str(ei.value.__cause__) or "raise Boom" in str(ei.value.__cause__)
    with pytest.raises(rpc.RemoteError, match="no pickle for you") as ei:
        pair.client.call("unpicklable", timeout=T)
    assert "Unpicklable" in ei.value.type_name
    # a result that will not pickle fails that call alone
    with pytest.raises(Exception, match="pickle"):
        pair.client.call("echo", threading.Lock(), timeout=T)
    with pytest.raises(TypeError, match="client.stream"):
        pair.client.call("count", 3, timeout=T)
    s = pair.client.stream("fail_after", 5, timeout=T)
    got = []
    with pytest.raises(Boom, match="after 5"):
        for x in s:
            got.append(x)
    assert got == [0, 1, 2, 3, 4]
    assert pair.client.call("add", 1, 1, timeout=T) == 2


def test_64_in_flight_complete_out_of_order_and_match_their_calls():
    p = Pair(max_concurrency=64, max_in_flight=64)
    try:
        rng = random.Random(1313)
        delays = [rng.uniform(0, 0.02) for _ in range(64)]
        order = []
        futs = []
        for i, d in enumerate(delays):
            f = p.client.submit("sleep_echo", i, d, timeout=T)
            f.add_done_callback(lambda f, i=i: order.append(i))
            futs.append(f)
        assert [f.result(T) for f in futs] == list(range(64))
        assert sorted(order) == list(range(64))
        assert order != list(range(64))  # completion followed the latencies, not the call order

        # the async handlers too
        async def many():
            return await asyncio.gather(*(p.client.acall("asleep_echo", i, d, timeout=T) for i, d in enumerate(delays)))

        assert asyncio.run(many()) == list(range(64))
    finally:
        p.close()


def test_a_client_at_its_limit_blocks_until_a_call_completes():
    p = Pair(max_in_flight=2)
    try:
        f1 = p.client.submit("block", 0.3, timeout=T)
        f2 = p.client.submit("block", 0.3, timeout=T)
        t0 = time.monotonic()
        with pytest.raises(rpc.DeadlineExceeded):
            p.client.submit("add", 1, 2, timeout=0.05)
        assert 0.04 < time.monotonic() - t0 < 0.29
        assert p.client.call("add", 1, 2, timeout=T) == 3  # waits for a slot, then runs
        assert f1.result(T) == f2.result(T) == "woke"

        async def limited():
            return await p.client.acall("add", 2, 2, timeout=T)

        p.client.submit("block", 0.1, timeout=T)
        p.client.submit("block", 0.1, timeout=T)
        assert asyncio.run(limited()) == 4
    finally:
        p.close()


def test_deadline_raises_on_time_even_if_the_server_is_stuck(pair):
    t0 = time.monotonic()
    with pytest.raises(rpc.DeadlineExceeded) as ei:
        pair.client.call("block", 1.0, timeout=0.1)
    el = time.monotonic() - t0
    assert isinstance(ei.value, TimeoutError) and 0.09 < el < 0.6
    fut = pair.client.submit("block", 1.0, timeout=0.1)
    with pytest.raises(rpc.DeadlineExceeded):
        fut.result(T)  # resolved by the deadline timer, nobody waiting in call()

    async def late():
        return await pair.client.acall("asleep_echo", 1, 1.0, timeout=0.1)

    with pytest.raises(rpc.DeadlineExceeded):
        asyncio.run(late())
    assert pair.client.call("add", 1, 2, timeout=T) == 3


def test_the_server_stops_an_async_handler_at_its_deadline(pair):
    """Enforced at the serving end as well: the handler's task is cancelled at the deadline and
    the caller gets DeadlineExceeded from the server (here the client's own timer is off)."""
    conn = pair.client._conn
    conn.expire = lambda call: None  # only the server's answer can resolve the call now
    t0 = time.monotonic()
    fut = pair.client.submit("await_until_cancelled", "deadline", 5.0, timeout=0.2)
    with pytest.raises(rpc.DeadlineExceeded, match="deadline passed while it ran"):
        fut.result(T)
    assert time.monotonic() - t0 < 4.0
    assert pair.client.call("wait_event", "deadline", T, timeout=T) == "CancelledError"


def test_server_never_starts_an_expired_call():
    ran = []
    p = Pair(handlers={"mark": lambda: ran.append(1), "echo": lambda x: x})
    try:
        conn = p.client._conn
        conn.limiter.acquire(0)
        call, _ = conn.start_call("mark", (), {}, time.monotonic_ns() - 1)  # already expired when it arrives
        with pytest.raises(rpc.DeadlineExceeded):
            call.future.result(T)
        assert p.client.call("echo", 5, timeout=T) == 5  # a later call on the same connection got through
        assert ran == []
    finally:
        p.close()


def test_cancel_drops_a_queued_call_and_reaches_running_handlers():
    p = Pair(max_concurrency=1)
    try:
        c = p.client
        running = c.submit("spin_until_cancelled", "sync", 5.0)
        queued = c.submit("spin_until_cancelled", "queued", 5.0)  # the pool's one thread is busy
        assert c.call("wait_event", "sync:started", T, timeout=T) is True
        assert queued.cancel() and running.cancel()
        assert running.cancelled() and queued.cancelled()
        assert c.call("wait_event", "sync", T, timeout=T) == "cancelled"  # rpc.cancelled() turned True
        assert c.call("add", 1, 1, timeout=T) == 2  # the pool is free again, after the queued call
        assert c.call("event", "queued:started", timeout=T) is None  # the queued call never started

        async def cancel_async():
            task = asyncio.ensure_future(c.acall("await_until_cancelled", "async", 5.0))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_async())
        assert c.call("wait_event", "async", T, timeout=T) == "CancelledError"
    finally:
        p.close()


def test_stream_backpressure_and_early_close(pair):
    s = pair.client.stream("count", 10**9, timeout=T)
    it = iter(s)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    assert len(s._st.items) <= rpc._server.STREAM_WINDOW  # the handler waits for credit
    s.close()
    assert s._call.future.cancelled()
    assert pair.client.call("add", 1, 2, timeout=T) == 3


def test_a_stream_that_ends_after_its_consumer_parked_wakes_it_at_once():
    """END arriving while the consumer waits on an empty stream ends the iteration then, not at the
    stream's deadline (found by shmhub.http, whose gateway awaits END after the last item)."""
    gate = threading.Event()

    def gen():
        yield 1
        gate.wait(T)

    p = Pair(handlers={"gen": gen})
    try:

        async def consume():
            s = p.client.stream("gen", timeout=T)
            first = await s.__anext__()
            asyncio.get_running_loop().call_later(0.05, gate.set)
            t0 = time.monotonic()
            rest = [x async for x in s]
            return [first, *rest], time.monotonic() - t0

        items, waited = asyncio.run(consume())
        assert items == [1] and waited < T / 4
        gate.clear()
        s = p.client.stream("gen", timeout=T)
        it = iter(s)
        assert next(it) == 1
        threading.Timer(0.05, gate.set).start()
        t0 = time.monotonic()
        assert list(it) == [] and time.monotonic() - t0 < T / 4
    finally:
        p.close()


def test_peer_gone_fails_calls_in_flight_and_later_ones_at_once(pair):
    futs = [pair.client.submit("block", 5.0) for _ in range(8)]
    pair.b.close()  # the serving end goes away
    for f in futs:
        with pytest.raises(PeerDead):
            f.result(T)
    t0 = time.monotonic()
    with pytest.raises(PeerDead):
        pair.client.call("add", 1, 2, timeout=T)
    assert time.monotonic() - t0 < 0.5


def test_closing_the_client_fails_calls_with_link_closed(pair):
    f = pair.client.submit("block", 5.0)
    pair.client.close()
    with pytest.raises(LinkClosed):
        f.result(T)
    with pytest.raises(LinkClosed):
        pair.client.call("add", 1, 2, timeout=T)


@pytest.mark.parametrize(
    "to, frame, words",
    [
        ("server", b"\x01\x02", "truncated"),
        ("client", b"\x01\x02", "truncated"),
        ("server", W.HEADER.pack(1, 42, 0, 0, 1, 0, 0, 0, 0), "unknown frame kind"),
        ("client", W.encode_frame(W.Kind.RESULT, 999, b""), "never issued"),
        ("server", W.encode_frame(W.Kind.CANCEL, 999, b""), "never requested"),
        ("server", W.encode_frame(W.Kind.REQUEST, 1, b"", method="x" * 60), "oversize"),
        ("client", W.encode_frame(W.Kind.ITEM, 1, b""), "not a stream"),
    ],
)
def test_malformed_frames_end_the_connection_with_a_protocol_error(to, frame, words):
    p = Pair()
    p.conn.assembler.max_frame = 80
    try:
        pending = p.client.submit("block", 5.0)
        if to == "client":  # e.g. a response: the client's connection must reject it
            p.b.inject(frame)
            with pytest.raises(RpcProtocolError, match=words):
                pending.result(T)
        else:  # a request-side frame: the server's connection rejects it, and closes its end
            assert p.client.call("add", 1, 2, timeout=T) == 3  # call 2 exists: CANCEL 999 is still unknown
            p.a.inject(frame)
            assert p.conn.done.wait(T)
            assert isinstance(p.conn.error, RpcProtocolError) and words in str(p.conn.error)
            with pytest.raises(PeerDead):
                pending.result(T)  # the client hears its peer is gone
    finally:
        p.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(delay_ms=st.floats(0, 3), action_at_ms=st.floats(0, 3), action=st.sampled_from(["cancel", "deadline", "close"]))
def test_every_call_resolves_exactly_once_whatever_races_it(delay_ms, action_at_ms, action):
    p = Pair(max_in_flight=8)
    try:
        settled = []
        timeout = action_at_ms / 1000 if action == "deadline" else None
        futs = [p.client.submit("sleep_echo", i, delay_ms / 1000, timeout=timeout) for i in range(8)]
        for f in futs:
            f.add_done_callback(lambda f: settled.append(f))
        if action != "deadline":
            time.sleep(action_at_ms / 1000)  # a race partner, not synchronisation
            if action == "cancel":
                for f in futs:
                    f.cancel()
            else:
                p.b.close()
        for f in futs:
            done, _ = cf.wait([f], T)  # wait() counts cancelled futures only once notified
            assert f in done
            if f.cancelled():
                continue
            exc = f.exception()
            assert exc is None or isinstance(exc, (rpc.DeadlineExceeded, PeerDead)), exc
            if exc is None:
                assert f.result() == futs.index(f)
        # A future's done callbacks run after its waiters wake: give the last ones their moment.
        end = time.monotonic() + T
        while len(settled) < 8 and time.monotonic() < end:
            time.sleep(0.001)
        assert len(settled) == 8 and len({id(f) for f in settled}) == 8
        lim = p.client._conn.limiter
        if action != "close":
            assert lim.free == 8  # every permit came back, once
    finally:
        p.close()


def test_msgspec_codec_carries_plain_data_and_errors_as_remote_errors():
    pytest.importorskip("msgspec")
    p = Pair(codec="msgspec")
    try:
        assert p.client.call("add", [1], [2], timeout=T) == [1, 2]
        assert p.client.call("echo", {"a": [1, 2.5, "x", None]}, timeout=T) == {"a": [1, 2.5, "x", None]}
        with pytest.raises(rpc.RemoteError, match="kaboom") as ei:
            p.client.call("boom", "kaboom", timeout=T)  # never unpickled, even though Boom pickles
        assert type(ei.value) is rpc.RemoteError and ei.value.type_name.endswith("Boom")
        with pytest.raises(TypeError):
            p.client.call("echo", object(), timeout=T)  # not plain data: refused before sending
        assert p.client._conn.limiter.free == 64  # and its in-flight permit came back
    finally:
        p.close()


def test_both_ends_must_agree_on_the_codec(pair):
    with pytest.raises(ValueError, match="pickle"):
        rpc.Client(pair.a, codec="bytes")


def test_an_objects_public_methods_are_served():
    class Calculator:
        def __init__(self):
            self.inner = H.Model()

        def double(self, x):
            return 2 * x

        def _hidden(self):
            return "no"

    p = Pair(handlers=Calculator())
    try:
        assert p.client.call("double", 21, timeout=T) == 42
        assert p.client.call("inner.predict", 2, timeout=T) == 6
        with pytest.raises(rpc.MethodNotFound, match="double"):  # the message lists what is served
            p.client.call("_hidden", timeout=T)
    finally:
        p.close()


def test_submit_stream_hands_items_to_a_callback_with_credit_past_the_window(pair, caplog):
    # 10x the window: the reader thread grants credit as the callback takes items, or it stalls.
    n = 10 * rpc._server.STREAM_WINDOW
    got = []
    f = pair.client.submit_stream("count", n, on_item=got.append, timeout=T)
    assert f.result(T) is None
    assert got == list(range(n))
    # The handler's error after its items: the items first, then the Future fails.
    got.clear()
    f = pair.client.submit_stream("fail_after", 3, on_item=got.append, timeout=T)
    with pytest.raises(Boom, match="after 3"):
        f.result(T)
    assert got == [0, 1, 2]

    # A callback that raises is logged; the stream and the connection go on.
    def picky(item):
        if item == 1:
            raise ValueError("not this one")
        got.append(item)

    got.clear()
    assert pair.client.submit_stream("count", 3, on_item=picky, timeout=T).result(T) is None
    assert got == [0, 2]
    assert "on_item callback failed" in caplog.text
    assert pair.client.call("add", 1, 2, timeout=T) == 3


def test_submit_stream_cancel_stops_the_handler(pair):
    got = []
    f = pair.client.submit_stream("count", 10**9, on_item=got.append, timeout=T)
    deadline = time.monotonic() + T
    while len(got) < 100 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert f.cancel()
    assert pair.client.call("add", 1, 2, timeout=T) == 3  # the reader is free and the link in order
    n = len(got)
    time.sleep(0.05)
    assert len(got) <= n + 2 * rpc._server.STREAM_WINDOW  # at most what was already granted


def test_server_aserve_in_a_running_loop():
    """Server.aserve over a channel that is not a shared-memory link: the connection's reader thread
    reads, the async handlers run in the awaiting loop; a timeout and a second loop are refused."""
    seen = []

    async def where():
        seen.append(threading.current_thread())
        return 7

    a, b = channel_pair()
    server = rpc.Server({**H.HANDLERS, "where": where})
    client = rpc.Client(a)

    async def main():
        serving = asyncio.ensure_future(server.aserve(b))
        await asyncio.sleep(0)
        assert await client.acall("where", timeout=T) == 7 and seen == [threading.current_thread()]
        assert await client.acall("add", 1, 2, timeout=T) == 3
        with pytest.raises(ValueError, match="another event loop"):
            await asyncio.get_running_loop().run_in_executor(None, lambda: asyncio.run(server.aserve(b)))
        b.close()  # the link ends: aserve returns
        await asyncio.wait_for(serving, T)

    try:
        asyncio.run(main())
        c, d = channel_pair()
        with pytest.raises(rpc.DeadlineExceeded):
            asyncio.run(rpc.aserve(d, H.HANDLERS, timeout=0.05))
        c.close()
    finally:
        client.close()
        server.close()


class _FullUntilRead(MemoryChannel):
    """A channel whose sends find no room until this end has read a message (a ring the peer can
    empty only once we take what it sent us): send(timeout=0) fails, a blocking send waits."""

    def __init__(self, ch: MemoryChannel) -> None:
        super().__init__(ch._rx, ch._tx)
        self.read = threading.Event()

    def send(self, data, timeout=None):
        if not self.read.is_set():
            if timeout == 0:
                raise ShmTimeout("no room")
            if not self.read.wait(timeout):
                raise ShmTimeout("no room")
        super().send(data, timeout)

    def recv(self, timeout=None):
        m = super().recv(timeout)
        self.read.set()
        return m


def test_a_caller_whose_send_must_wait_leaves_the_reading_to_the_reader_thread():
    """call() reads its own answer, but a send that has to wait for room must not hold the read
    role meanwhile: the room may come only from reading what the peer sent (here a call of the
    peer's), so the reader thread reads while the caller waits."""
    a, b = channel_pair()
    a = _FullUntilRead(a)
    server = rpc.Server(H.HANDLERS)
    server.attach(b)
    peer = rpc.Client(b)  # b's calls go to a, where nothing serves
    client = rpc.Client(a)
    try:
        asked = peer.submit("anything", timeout=T)  # waits, unread, on a's side
        assert client.call("add", 1, 2, timeout=2.0) == 3
        with pytest.raises(rpc.MethodNotFound):
            asked.result(T)
    finally:
        client.close()
        peer.close()
        server.close()
