"""Handlers served by the test servers (in-process and in guest processes)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from shmhub import rpc


class Boom(Exception):
    """A picklable error raised on purpose."""


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("this exception refuses to pickle")


def add(a, b):
    return a + b


@rpc.inline
def null():
    return None


@rpc.inline
def now():
    return time.monotonic_ns()


def echo(x):
    return x


def sleep_echo(x, delay):
    time.sleep(delay)  # a handler latency; the test matches results to calls
    return x


async def asleep_echo(x, delay):
    await asyncio.sleep(delay)
    return x


def boom(msg):
    raise Boom(msg)


def unpicklable():
    raise Unpicklable("no pickle for you")


def blobs(n, size):
    """n arrays of `size` bytes: each above the out-of-band threshold, so each arrives as a view
    of its slot (bytes would be copied out on receipt)."""
    import numpy as np

    for i in range(n):
        yield np.full(size, i % 256, dtype=np.uint8)


async def ablobs(n, size):
    """blobs() from the serving loop."""
    import numpy as np

    for i in range(n):
        yield np.full(size, i % 256, dtype=np.uint8)


def count(n):
    for i in range(n):
        yield i


async def acount(n):
    for i in range(n):
        await asyncio.sleep(0)
        yield i


def fail_after(n):
    for i in range(n):
        yield i
    raise Boom(f"after {n}")


_events = {}
_lock = threading.Lock()


def spin_until_cancelled(tag, limit):
    """Polls rpc.cancelled() (the sync handler's way to learn of a cancel); records that it saw it."""
    with _lock:
        _events[tag + ":started"] = True
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if rpc.cancelled():
            with _lock:
                _events[tag] = "cancelled"
            return "cancelled"
        time.sleep(0.001)
    with _lock:
        _events[tag] = "ran out"
    return "ran out"


async def await_until_cancelled(tag, limit):
    try:
        await asyncio.sleep(limit)
    except asyncio.CancelledError:
        with _lock:
            _events[tag] = "CancelledError"
        raise
    with _lock:
        _events[tag] = "ran out"
    return "ran out"


@rpc.inline
def event(tag):
    with _lock:
        return _events.get(tag)


async def wait_event(tag, limit):
    """Async, so it needs no pool thread (the tests fill the pool) and blocks nothing: dispatched
    in order, after the frames sent before it (cancels) were handled."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with _lock:
            if tag in _events:
                return _events[tag]
        await asyncio.sleep(0.001)
    return None


def block(seconds):
    time.sleep(seconds)
    return "woke"


def pid():
    return os.getpid()


def array_info(a):
    """(shape, sum, writeable, base-is-view) of an argument, to check the zero-copy receipt."""
    return a.shape, float(a.sum()), bool(a.flags.writeable), a.base is not None


def make_array(n, value):
    import numpy as np

    return np.full(n, value, dtype=np.float64)


def nbytes(x):
    return memoryview(x).nbytes


_hoard = []


def hoard(a, keep, drop):
    """Keep the received view (zero-copy: it holds its slot or mapping) or not, and drop some kept
    ones: seeded by the caller, so the guest's side keeps and drops views at random too."""
    if keep:
        _hoard.append(a)
    for i in sorted(drop, reverse=True):
        if i < len(_hoard):
            _hoard.pop(i)
    del _hoard[:-6]  # bounded: a link has at most 16 mappings a direction, and the caller waits for one
    return len(_hoard)


def drop_hoard():
    _hoard.clear()
    import gc

    gc.collect()
    return 0


class Model:
    def __init__(self):
        self.scale = 3

    def predict(self, x):
        return x * self.scale

    def _private(self):
        return "secret"


async def where_async():
    """Which thread an async handler runs in: the serving loop's (rpc.serve runs it in the main thread)."""
    return threading.current_thread() is threading.main_thread()


HANDLERS = {
    "add": add,
    "null": null,
    "now": now,
    "echo": echo,
    "sleep_echo": sleep_echo,
    "asleep_echo": asleep_echo,
    "boom": boom,
    "unpicklable": unpicklable,
    "count": count,
    "blobs": blobs,
    "ablobs": ablobs,
    "acount": acount,
    "fail_after": fail_after,
    "spin_until_cancelled": spin_until_cancelled,
    "await_until_cancelled": await_until_cancelled,
    "event": event,
    "wait_event": wait_event,
    "block": block,
    "pid": pid,
    "array_info": array_info,
    "make_array": make_array,
    "hoard": hoard,
    "drop_hoard": drop_hoard,
    "nbytes": nbytes,
    "model": Model(),
    "where_async": where_async,
}
