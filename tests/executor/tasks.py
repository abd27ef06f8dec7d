"""Task functions for the executor tests (importable by workers: they are not in __main__)."""

from __future__ import annotations

import os
import signal
import time


def add(a, b=0):
    return a + b


def pid():
    return os.getpid()


def boom(msg):
    raise ValueError(msg)


def exit_with(code):
    os._exit(code)


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def sleep(t, value=None):
    time.sleep(t)
    return value


def spin(t):
    end = time.monotonic() + t
    n = 0
    while time.monotonic() < end:
        n += 1
    return n


def crash_once(marker):
    """Dies the first time (the marker file does not exist yet), returns its pid the second."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(9)
    return os.getpid()


def unpicklable_result():
    return lambda: None


def total(a):
    return float(a.sum())


def fill(a, value):
    a[:] = value
    return None


def halve(a):
    """A view of its argument: comes back by reference when the argument is a shared array."""
    return a[: len(a) // 2]


def state(_=None):
    return os.environ.get("SHMHUB_TEST_INIT")


def init_env(value):
    os.environ["SHMHUB_TEST_INIT"] = value


def init_fail():
    raise RuntimeError("initializer says no")


def nested(n):
    import shmhub

    with shmhub.Executor(1) as ex:
        return list(ex.map(add, range(n), range(n)))


def echo_after(value, delay):
    time.sleep(delay)
    return value, os.getpid()
