"""What `shmhub top` and `shmhub clean` know about hubs, as plain data: read-only samples of a
segment, rates between two samples, the processes that hold a segment, stale named segments.

Nothing here draws or writes to shared memory; `cli` does the drawing.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from . import layout as L
from .guest import ENV
from .peers import STATE_NAMES
from .segment import Segment
from .slots import pool_stats

Sample = Dict[str, Any]


def _ring(ring: Any) -> Dict[str, int]:
    write, watermark, read = ring.indices
    used = (watermark - read) + write if watermark else max(0, write - read)
    producer_waiting, consumer_waiting = ring.waiting
    out = {
        "write": write,
        "watermark": watermark,
        "read": read,
        "capacity": ring.capacity,
        "used": used,
        "producer_waiting": producer_waiting,
        "consumer_waiting": consumer_waiting,
    }
    sent = ring.sent  # FEATURE_RING_COUNTERS
    if sent is not None:
        out["sent_messages"], out["sent_bytes"] = sent
        out["doorbells"] = ring.doorbells
    return out


def slots_held(seg: Segment) -> Dict[int, List[int]]:
    """{owner: [allocated slots per class]} over every mapped extent; owner 0 is the host."""
    pool = seg.pool
    held: Dict[int, List[int]] = {}
    for c in range(pool.num_classes):
        _, count = pool.class_info(c)
        for e in range(pool.mapped_extents(c)):
            for s in range(count):
                _, state, owner, _ = pool.slot_meta(c, s, e)
                if state == L.SLOT_ALLOCATED:
                    held.setdefault(owner, [0] * pool.num_classes)[c] += 1
    return held


def sample(seg: Segment) -> Sample:
    """One read-only look at a segment: header facts, per-peer state, rings, slots and mappings."""
    seg.refresh_extents()
    held = slots_held(seg)
    classes = seg.pool.num_classes
    peers = {}
    for pid in range(1, seg.config.max_guests + 1):
        state = seg.region.load_u32(seg.layout.peer_entry_offset(pid) + L.PEER_STATE)
        entry: Dict[str, Any] = {
            "state": STATE_NAMES.get(state, f"Unknown({state})"),
            "epoch": seg.peers.epoch(pid),
            "last_heartbeat": seg.peers.last_heartbeat(pid),
            "g2h": _ring(seg.g2h(pid)),
            "h2g": _ring(seg.h2g(pid)),
            "slots_held": held.get(pid, [0] * classes),
        }
        if seg.features & L.FEATURE_MMAP_LEASES:
            entry["mmap"] = seg.peers.mmap_counters(pid)
        peers[pid] = entry
    return {
        "time_ns": time.monotonic_ns(),
        "host_goodbye": bool(seg.host_goodbye),
        "current_size": seg.current_size,
        "classes": [dict(c, waiters=seg.pool.waiting(c["class"])) for c in pool_stats(seg.pool)],
        "host_slots_held": held.get(0, [0] * classes),
        "peers": peers,
    }


def ring_advance(before: Dict[str, int], after: Dict[str, int]) -> int:
    """Bytes the consumer released between two looks at a ring (frame headers included): the read
    index's progress, across one wrap. A lower bound: laps between the looks are not seen."""
    if after["read"] >= before["read"]:
        return after["read"] - before["read"]
    # The reader wrapped at the watermark: the one it saw, or one the writer set later (>= its write).
    end = before["watermark"] or before["write"]
    return max(0, end - before["read"]) + after["read"]


def _direction(b: Dict[str, int], a: Dict[str, int], dt: float) -> Tuple[float, Optional[float], Optional[float]]:
    """(payload bytes/s, messages/s, doorbells/s) of one ring: from the producer's counters
    (FEATURE_RING_COUNTERS), else bytes/s estimated from the read index (frame headers included)."""
    if "sent_messages" in a and "sent_messages" in b:
        if a["sent_messages"] < b["sent_messages"] or a["doorbells"] < b["doorbells"]:  # reset by a recovery
            return 0.0, 0.0, 0.0
        return ((a["sent_bytes"] - b["sent_bytes"]) / dt, (a["sent_messages"] - b["sent_messages"]) / dt, (a["doorbells"] - b["doorbells"]) / dt)
    return ring_advance(b, a) / dt, None, None


def rates(before: Sample, after: Sample) -> Dict[int, Dict[str, Any]]:
    """{peer_id: {"g2h": bytes/s, "h2g": bytes/s, "g2h_mps": messages/s, "h2g_mps": ..., "g2h_bps":
    doorbells/s rung by the guest, "h2g_bps": ... by the host}} of ring traffic between two samples
    (message and doorbell rates None without FEATURE_RING_COUNTERS)."""
    dt = max(1, after["time_ns"] - before["time_ns"]) / 1e9
    out: Dict[int, Dict[str, Any]] = {}
    for pid, a in after["peers"].items():
        b = before["peers"].get(pid)
        if b is None or b["epoch"] != a["epoch"] or a["state"] != "Attached":
            zero = 0.0 if "sent_messages" in a["g2h"] else None  # a reset ring has no progress to measure
            out[pid] = {"g2h": 0.0, "h2g": 0.0, "g2h_mps": zero, "h2g_mps": zero, "g2h_bps": zero, "h2g_bps": zero}
            continue
        out[pid] = {}
        for d in ("g2h", "h2g"):
            out[pid][d], out[pid][d + "_mps"], out[pid][d + "_bps"] = _direction(b[d], a[d], dt)
    return out


def _same_file(path: str, key: Tuple[int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == key


def _guest_peer(pid: int) -> Optional[int]:
    """The peer id Host.spawn gave process `pid` (its initial environment), if any."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return None
    prefix = ENV.encode() + b"="
    for var in env:
        if var.startswith(prefix):
            try:
                return int(json.loads(var[len(prefix) :])["peer_id"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def holders(path: str) -> Dict[str, Any]:
    """Processes holding the segment at `path` open: {"pids": [...], "guests": {peer_id: pid}};
    a process started by Host.spawn is recognised by its environment. Only processes we may read."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino)
    pids, guests = [], {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        if any(_same_file(f"/proc/{pid}/fd/{fd}", key) for fd in fds):
            pids.append(pid)
            peer = _guest_peer(pid)
            if peer is not None:
                guests[peer] = pid
    return {"pids": sorted(pids), "guests": guests}


def segment_fds(pid: int) -> List[str]:
    """/proc/PID/fd/N paths of the shmhub segments process `pid` holds: memfds named "shmhub" and
    files whose first bytes are a segment magic."""
    out = []
    try:
        fds = sorted(os.listdir(f"/proc/{pid}/fd"), key=int)
    except OSError as e:
        raise ProcessLookupError(f"cannot read the fds of process {pid}: {e.strerror}") from None
    for fd in fds:
        path = f"/proc/{pid}/fd/{fd}"
        try:
            target = os.readlink(path)
        except OSError:
            continue
        if target.startswith("/memfd:shmhub ") or (target.startswith("/") and not target.startswith("/memfd:") and has_magic(path)):
            out.append(path)
    return out


def _open_segment_file(path: str) -> Optional[int]:
    """A read-only fd of `path` if it is a regular file starting with a segment magic, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.pread(fd, 8, 0) in L.ACCEPTED_MAGICS:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def has_magic(path: str) -> bool:
    fd = _open_segment_file(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


@dataclass
class Stale:
    """A named segment nobody created any more: its creator's flock is free."""

    path: str
    size: int
    holders: List[int] = field(default_factory=list)


def _stale_fd(path: str) -> Optional[int]:
    """An fd of `path` holding its flock if the segment is stale, else None. A host holds an
    exclusive flock for its lifetime (DECISIONS 16) and writes the magic only after taking it, so a
    valid magic with a free lock means the creator is gone (and we never lock a segment being made)."""
    fd = _open_segment_file(path)
    if fd is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:  # BlockingIOError: a live host holds it
        os.close(fd)
        return None


def is_stale(path: str) -> bool:
    fd = _stale_fd(path)
    if fd is not None:
        os.close(fd)
    return fd is not None


def remove_if_stale(path: str) -> bool:
    """Unlink `path` if it is (still) a stale segment, holding its lock while checking that the
    name still leads to the same file; True if removed."""
    fd = _stale_fd(path)
    if fd is None:
        return False
    try:
        st, now = os.fstat(fd), os.stat(path)
        if (st.st_dev, st.st_ino) != (now.st_dev, now.st_ino):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def stale_segments(paths: List[str]) -> List[Stale]:
    """The stale segments among `paths` (files; directories are searched one level deep)."""
    found = []
    for p in paths:
        names = [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
        for name in names:
            if os.path.isfile(name) and not os.path.islink(name) and is_stale(name):
                found.append(Stale(name, os.path.getsize(name), holders(name)["pids"]))
    return found
