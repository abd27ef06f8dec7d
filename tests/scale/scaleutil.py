"""Helpers of the scale tests: guest programs, CPU time from /proc, waiting on events and fds."""

from __future__ import annotations

import json
import os
import select
import sys
import threading
import time

GUESTS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "guests"))
if GUESTS not in sys.path:
    sys.path.insert(0, GUESTS)

import scale_proto  # noqa: E402,F401  (tests/guests/scale_proto.py, shared with the guest program)

LINK_TESTS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "link"))
if LINK_TESTS not in sys.path:
    sys.path.insert(0, LINK_TESTS)

from linkutil import wait_event  # noqa: E402,F401  (re-exported for the scale tests)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def guest_argv(mode: str, idx: int, **params) -> list:
    return [sys.executable, os.path.join(GUESTS, "scale_guest.py"), mode, str(idx), json.dumps(params)]


def spawn(host, mode: str, idx: int, popen_kwargs: dict | None = None, **params):
    """Start tests/guests/scale_guest.py in `mode` as a guest of `host`."""
    return host.spawn(guest_argv(mode, idx, **params), **(popen_kwargs or {}))


def _stat_fields(path: str) -> list:
    with open(path) as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces


def proc_state(pid: int) -> str:
    """R, S, D, Z, ... of a process ("" if it is gone)."""
    try:
        return _stat_fields(f"/proc/{pid}/stat")[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


def cpu_seconds(path: str) -> float:
    """utime + stime of /proc/<pid>/stat or /proc/<pid>/task/<tid>/stat, in seconds."""
    f = _stat_fields(path)
    return (int(f[11]) + int(f[12])) / CLK_TCK


def sched_seconds(path: str) -> float:
    """Time on CPU from .../schedstat (nanosecond resolution; 0 where the kernel has none)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0]) / 1e9
    except (FileNotFoundError, IndexError, ValueError):
        return 0.0


def host_threads() -> dict:
    """tid -> Python thread name (or "?") of this process's threads."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    return {int(tid): names.get(int(tid), "?") for tid in os.listdir("/proc/self/task")}


def read_exact(fd: int, n: int, timeout: float, what: str) -> bytes:
    """n bytes from a pipe, waiting for each with select (nothing is polled on a timer)."""
    deadline = time.monotonic() + timeout
    got = b""
    while len(got) < n:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise AssertionError(f"{what}: {len(got)} of {n} within {timeout} s")
        r, _, _ = select.select([fd], [], [], rem)
        if r:
            chunk = os.read(fd, n - len(got))
            if not chunk:
                raise AssertionError(f"{what}: pipe closed after {len(got)} of {n}")
            got += chunk
    return got


def free_counts(host) -> list:
    """(free, allocated) of every slot class of the host's segment."""
    pool = host.segment.pool
    return [pool.counts(c) for c in range(pool.num_classes)]
