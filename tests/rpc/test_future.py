"""LazyFuture: rpc's submit() futures and the executor's, whose Condition is made on first use."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import pytest

T = 20.0


def test_a_lazy_future_has_the_fields_of_a_future():
    """LazyFuture does not call cf.Future.__init__ (its Condition is made on first use): it must
    still set every field the running Python's Future has, and behave as one."""
    from shmhub.rpc._future import LazyFuture

    assert set(vars(cf.Future())) - {"_condition", "_waiters"} <= set(vars(LazyFuture()))
    f = LazyFuture()
    assert f.set_running_or_notify_cancel() and f.running()
    f.set_exception(ValueError("x"))
    assert isinstance(f.exception(0), ValueError) and not f.cancelled()
    with pytest.raises(cf.InvalidStateError):
        f.set_result(1)
    g = LazyFuture()
    assert g.cancel() and g.cancelled() and not g.set_running_or_notify_cancel()


def test_lazy_futures_settled_while_waiters_arrive():
    """The Condition made by a waiter while another thread settles the future without one: no
    waiter misses the result (seeded random timing)."""
    import random

    from shmhub.rpc._future import LazyFuture

    rng = random.Random(7)
    for trial in range(200):
        fs = [LazyFuture() for _ in range(8)]
        delays = [rng.random() * 1e-4 for _ in fs]
        how = trial % 4

        def settle_all():
            for f, d in zip(fs, delays):
                time.sleep(d)
                f.set_running_or_notify_cancel()
                f.set_result(d)

        t = threading.Thread(target=settle_all)
        t.start()
        if how == 0:
            assert len(cf.wait(fs, T).done) == len(fs)
        elif how == 1:
            assert len(list(cf.as_completed(fs, T))) == len(fs)
        elif how == 2:
            got = []
            for f in fs:
                f.add_done_callback(got.append)
            t.join(T)
            assert sorted(map(id, got)) == sorted(map(id, fs))
        else:
            assert [f.result(T) for f in fs] == delays
        t.join(T)
