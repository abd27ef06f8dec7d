"""CallFuture: the lean future of call()/acall() keeps concurrent.futures.Future's contract."""

import concurrent.futures as cf
import random
import threading

import pytest

from shmhub.rpc._conn import CallFuture, settle


def test_settles_once_and_reports_it():
    f = CallFuture()
    seen = []
    f.add_done_callback(lambda x: seen.append(x.result()))
    assert not f.done()
    assert settle(f, 7)
    assert not settle(f, 8) and not settle(f, exc=ValueError())
    with pytest.raises(cf.InvalidStateError):
        f.set_result(9)
    assert f.done() and f.result() == 7 and f.exception() is None and seen == [7]
    f.add_done_callback(lambda x: seen.append("late"))  # after done: runs at once
    assert seen == [7, "late"]
    assert not f.cancel()


def test_exception_and_cancel():
    f = CallFuture()
    settle(f, exc=KeyError("k"))
    with pytest.raises(KeyError):
        f.result()
    assert isinstance(f.exception(), KeyError)
    g = CallFuture()
    calls = []
    g.add_done_callback(calls.append)
    assert g.cancel() and g.cancel() and g.cancelled() and calls == [g]
    assert not g.set_running_or_notify_cancel()
    with pytest.raises(cf.CancelledError):
        g.result()


def test_timeout_leaves_no_waiter_and_a_waiter_is_woken():
    f = CallFuture()
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.02)
    assert not f._waiters
    got = []
    t = threading.Thread(target=lambda: got.append(f.result(timeout=10)))
    t.start()
    threading.Timer(0.05, lambda: settle(f, "ok")).start()
    t.join(10)
    assert got == ["ok"]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_racing_settlers_one_wins(seed):
    rng = random.Random(seed)
    for _ in range(300):
        f = CallFuture()
        wins = []
        done_calls = []
        f.add_done_callback(done_calls.append)
        barrier = threading.Barrier(3)

        def racer(kind):
            barrier.wait(5)
            for _ in range(rng.randrange(50)):
                pass
            if kind == 0:
                wins.append(("result", settle(f, 1)))
            elif kind == 1:
                wins.append(("exc", settle(f, exc=TimeoutError())))
            else:
                wins.append(("cancel", f.cancel()))

        ts = [threading.Thread(target=racer, args=(k,)) for k in range(3)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(5)
        won = [k for k, ok in wins if ok]
        assert len(won) == 1
        assert len(done_calls) == 1 and f.done()
