"""shmhub.rpc over a remote link, unchanged: calls, streams, asyncio, errors, out-of-band arrays,
deadlines (sent as budgets: the ends' clocks are not shared), and PeerDead for calls in flight."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from remoteutil import LIVENESS, T, pair_on, start_guest, stop

from shmhub import PeerDead, rpc


@pytest.fixture
def served(listener):
    proc = start_guest("rpc_server.py", listener.endpoint, LIVENESS)
    g = listener.accept(timeout=T)
    client = rpc.Client(g.link)
    yield g, client, proc
    client.close()
    stop(proc)


def test_calls_streams_errors_and_asyncio(served):
    g, c, proc = served
    assert c.call("add", 2, 3, timeout=T) == 5
    assert c.call("pid", timeout=T) == proc.pid
    assert list(c.stream("count", 100, timeout=T)) == list(range(100))
    with pytest.raises(rpc.MethodNotFound):
        c.call("nope", timeout=T)
    with pytest.raises(Exception, match="kaboom"):
        c.call("boom", "kaboom", timeout=T)

    async def go():
        return await asyncio.gather(*(c.acall("add", i, 1, timeout=T) for i in range(50)))

    assert asyncio.run(go()) == [i + 1 for i in range(50)]


def test_arrays_travel_as_out_of_band_frames(served):
    g, c, _ = served
    a = np.arange(1 << 20, dtype=np.float64)
    shape, total, _, _ = c.call("array_info", a, timeout=T)
    assert shape == a.shape and total == float(a.sum())
    b = c.call("make_array", 300_000, 2.5, timeout=T)
    assert b.shape == (300_000,) and float(b.sum()) == 750_000.0


def test_a_deadline_is_kept_across_the_link(served):
    g, c, _ = served
    t0 = time.monotonic()
    with pytest.raises(rpc.DeadlineExceeded):
        c.call("sleep_echo", 1, 5.0, timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert c.call("sleep_echo", 7, 0.01, timeout=T) == 7  # a budget, not a foreign clock's deadline


def test_a_remote_request_carries_its_budget_not_an_absolute_deadline(listener):
    g, link = pair_on(listener)
    c = rpc.Client(g.link)
    try:
        f = c.submit("add", 1, 2, timeout=5.0)
        with link.recv(timeout=T) as m:
            from shmhub.rpc._wire import decode_frame

            budget = decode_frame(m, 1 << 20).deadline_ns
        assert 4e9 < budget <= 5e9  # the remaining ns, not time.monotonic_ns() + 5 s
        f.cancel()
    finally:
        c.close()
        link.close()


def test_calls_in_flight_fail_with_peer_dead_when_the_server_is_killed(served):
    g, c, proc = served
    futs = [c.submit("block", 30) for _ in range(3)]
    time.sleep(0.2)
    proc.kill()
    t0 = time.monotonic()
    for f in futs:
        with pytest.raises(PeerDead):
            f.result(T)
    assert time.monotonic() - t0 < LIVENESS + 1.5
    with pytest.raises(PeerDead):
        c.call("add", 1, 1, timeout=T)
