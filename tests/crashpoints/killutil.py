"""Shared by the kill-anywhere tests: a host-side echo of crashpoint_guest.py's workloads, and the
checks that a dead guest left nothing behind (docs/hardening.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import List, Optional

from shmhub import Host, SegmentConfig, rpc
from shmhub import layout as L
from shmhub.errors import ShmhubError

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(os.path.dirname(HERE), "guests", "crashpoint_guest.py")

T = 20.0
# A small ring (wraps within a run), growable slot classes (the host takes their free slots before
# the guest under test starts, so it must ask for growth), a largest slot of 16 KiB (bigger
# payloads take the mmap tier).
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=256, inline_threshold=64, size_classes=((256, 16), (4096, 4, 4), (16384, 4, 4)))


def fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))  # (the listing's own fd is closed again after it)


def mappings() -> int:
    """Mappings of the mmap tier in this process."""
    with open("/proc/self/maps") as f:
        return sum("shmhub-map" in line for line in f)


def wait_for(pred, what: str) -> None:
    deadline = time.monotonic() + T
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def echo(h) -> None:
    """Host side of the workloads: echo each message until the guest is gone, and receive (and
    release) to the end what it sent before it died: recovery keeps those in the link's backlog."""
    gone = False
    while True:
        try:
            msg = h.link.recv(timeout=T)
        except ShmhubError:
            return
        data = bytes(msg)
        msg.release()
        if not gone:
            try:
                h.link.send(data, timeout=T)
            except ShmhubError:
                gone = True


def _attached(host: Host, timeout: float = T):
    """The handle of the guest that attached through the bootstrap socket; None if no guest
    attached within timeout, or it is gone already (recovery is then waited for by the caller)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ev = host.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # queue.Empty
            return None
        if ev.kind == "attached":
            return next((g for g in host.guests if g.peer_id == ev.peer_id), None)


def hog(host: Host) -> list:
    """Take every free slot of the growable classes (as the host): the guest's first slot sends
    then find them exhausted and ask the host to grow them."""
    pool, refs = host.segment.pool, []
    for c in (1, 2):
        while (ref := pool.alloc_in_class(c, 0)) is not None:
            refs.append(ref)
    return refs


def run_guest(host: Host, mode: str, rounds: int, env: dict, sock: str, *, take_slots: bool = False, kill_after: Optional[float] = None) -> int:
    """Start a crashpoint_guest in `mode` and serve it until it ends; its return code. kill_after:
    SIGKILL it that many seconds after its go (it waits for the go once started: --sync)."""
    taken = hog(host) if take_slots else []
    sync = ["--sync"] if kill_after is not None else []
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True} if sync else {}
    server = None
    if mode == "bootstrap":
        proc = subprocess.Popen([sys.executable, GUEST, *sync, mode, sock, str(rounds)], env=env, **pipes)
        h = None
    else:
        h = host.spawn([sys.executable, GUEST, *sync, mode, str(rounds)], env=env, **pipes)
        proc = h.process
    timer = None
    try:
        if sync:
            assert proc.stdout.readline() == "ready\n"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            timer = threading.Timer(kill_after, proc.send_signal, (signal.SIGKILL,))
            timer.start()
        if mode == "bootstrap":
            h = _attached(host, T if kill_after is None else kill_after + 1.0)
        if mode == "rpc":
            server = rpc.Server({"sink": lambda a, b: len(bytes(a)) + len(bytes(b))})
            server.attach(h.link)
        elif h is not None:
            echo(h)
        rc = proc.wait(T)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                f.close()
    if h is not None:
        wait_for(lambda: h.recovered, "the host to recover the guest")
    for ref in taken:
        host.segment.pool.free(*ref)
    if server is not None:
        server.close()
    return rc


def assert_pristine(host: Host) -> None:
    """Every slot of every class, every extent included, Free and on its free list exactly once."""
    seg = host.segment
    seg.refresh_extents()
    pool = seg.pool
    for c in range(pool.num_classes):
        free, allocated = pool.counts(c)
        _, count = pool.class_info(c)
        held = {(e, s): pool.slot_meta(c, s, e) for e in range(pool.mapped_extents(c)) for s in range(count) if pool.slot_meta(c, s, e)[1] != L.SLOT_FREE}
        assert allocated == 0, f"class {c}: {allocated} slots still allocated: (gen, state, owner, next) {held}"
        _, idx = pool.free_head(c)
        seen = set()
        while idx != L.EMPTY_INDEX:
            assert idx not in seen, f"class {c}: slot {idx} twice on the free list"
            seen.add(idx)
            idx = pool.slot_meta(c, idx % count, idx // count)[3]
        assert len(seen) == free == count * pool.mapped_extents(c), f"class {c}: {len(seen)} slots listed, {free} free, {count * pool.mapped_extents(c)} in all"


def assert_left_nothing(host: Host, fds_before: List[str], maps_before: int) -> None:
    """After a guest's death: every peer Empty, the pool whole, its mappings and fds gone."""
    seg = host.segment
    wait_for(lambda: all(seg.peers.state(p) == L.PEER_EMPTY for p in range(1, seg.config.max_guests + 1)), "every peer entry to be Empty")
    assert_pristine(host)
    wait_for(lambda: mappings() == maps_before, "the dead guest's mappings to be closed")
    try:  # (one open at the baseline may be gone since: the previous guest's, closed late)
        wait_for(lambda: set(fds()) <= set(fds_before), "the host to hold no fd it did not hold before")
    except AssertionError:
        extra = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in set(fds()) - set(fds_before) if os.path.lexists(f"/proc/self/fd/{fd}")}
        raise AssertionError(f"the host holds fds it did not hold before the guest: {extra}") from None
