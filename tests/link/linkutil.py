"""Helpers for the link tests: spawning guest programs of tests/guests, events, pool counts."""

from __future__ import annotations

import os
import queue
import sys
import time

GUESTS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "guests"))
if GUESTS not in sys.path:
    sys.path.insert(0, GUESTS)

import common  # noqa: E402  (tests/guests/common.py, shared with the guest programs)

payload = common.payload
Stream = common.Stream
gil_ratio = common.gil_ratio


def guest_argv(name: str, *args) -> list:
    return [sys.executable, os.path.join(GUESTS, name), *map(str, args)]


def spawn(host, name: str, *args, **kwargs):
    """Start tests/guests/<name> as a guest of `host`."""
    return host.spawn(guest_argv(name, *args), **kwargs)


def wait_event(host, kind: str, peer_id: int | None = None, timeout: float = 10.0, seen: list | None = None):
    """The next host event of `kind` (for `peer_id` if given); other events go to `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        rem = deadline - time.monotonic()
        if rem <= 0:
            raise AssertionError(f"no {kind!r} event within {timeout} s (saw {seen})")
        try:
            ev = host.events.get(timeout=rem)
        except queue.Empty:
            continue
        if ev.kind == kind and (peer_id is None or ev.peer_id == peer_id):
            return ev
        if seen is not None:
            seen.append(ev)


def allocated(pool) -> list:
    """Allocated slot count of every class."""
    return [pool.counts(c)[1] for c in range(pool.num_classes)]


def allocated_slots(pool, class_idx: int) -> list:
    """(slot_idx, generation, owner) of the allocated slots of a class."""
    out = []
    for s in range(pool.class_info(class_idx)[1]):
        gen, state, owner, _ = pool.slot_meta(class_idx, s)
        if state == 1:
            out.append((s, gen, owner))
    return out


def class_for(config, n: int) -> int:
    """The slot class a payload of n bytes goes to when the pool has room."""
    for c, (size, _) in enumerate(config.size_classes):
        if size >= n + 4:
            return c
    raise ValueError(n)


def wait_until(pred, timeout: float = 5.0, what: str = "condition"):
    """pred()'s first truthy value, checked every 2 ms; AssertionError after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.002)
