"""The guest side: connect() inside a spawned child, Guest.attach() for a walk-in guest."""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Optional

from .doorbell import Doorbell
from .errors import SegmentError, ShmhubError
from .link import DEFAULT_SPIN_NS, GUEST, Link
from .segment import Segment

ENV = "SHMHUB_GUEST"  # set by Host.spawn: {"v": 1, "peer_id": N, "segment_fd": N, "doorbell_fd": N, "control_fd": N}
ENV_VERSION = 1


def _heartbeat_thread(link: Link, interval_ns: int) -> None:
    """Optional heartbeats (DECISIONS 14): a daemon thread stamps the peer entry while the link lives."""
    def run() -> None:
        while not link.closed and link.alive:
            try:
                link.segment.peers.heartbeat(link.peer_id)
            except (ValueError, ShmhubError):
                return
            time.sleep(interval_ns / 2e9)

    threading.Thread(target=run, name=f"shmhub-heartbeat-{link.peer_id}", daemon=True).start()


def connect(*, spin_ns: int = DEFAULT_SPIN_NS) -> Link:
    """Inside a child started by Host.spawn: map the segment, claim the reserved peer, return the Link."""
    spec = os.environ.get(ENV)
    if not spec:
        raise SegmentError(f"{ENV} is not set: connect() works in a process started by Host.spawn")
    try:
        info = json.loads(spec)
        if info.get("v") != ENV_VERSION:
            raise ValueError(f"version {info.get('v')!r}")
        peer_id, seg_fd, bell_fd = int(info["peer_id"]), int(info["segment_fd"]), int(info["doorbell_fd"])
        ctrl_fd = int(info["control_fd"])
    except (ValueError, KeyError, TypeError) as e:
        raise SegmentError(f"malformed {ENV}={spec!r}: {e}") from None
    del os.environ[ENV]  # our own children are not guests of this host
    try:
        seg = Segment.attach(seg_fd)  # attach through the fd (trap 17), sized by fstat
    finally:
        os.close(seg_fd)
    try:
        if not 1 <= peer_id <= seg.config.max_guests:  # trap 16
            raise SegmentError(f"peer_id {peer_id} out of range 1..{seg.config.max_guests}")
        doorbell = Doorbell.from_fd(bell_fd)
    except BaseException:
        seg.close()
        raise
    try:
        control = socket.socket(fileno=ctrl_fd)
        control.setblocking(False)
        os.set_inheritable(ctrl_fd, False)
        seg.peers.claim(peer_id)
    except BaseException:
        doorbell.close()
        seg.close()
        raise
    link = Link(seg, peer_id, doorbell, GUEST, control=control, spin_ns=spin_ns, owns_segment=True)
    if seg.config.heartbeat_interval_ns:
        _heartbeat_thread(link, seg.config.heartbeat_interval_ns)
    return link


class Guest:
    """Walk-in guests on a named segment."""

    @staticmethod
    def attach(path: str, *, spin_ns: int = DEFAULT_SPIN_NS) -> Link:
        """Attach to a named segment, take an Empty peer entry, return the Link.
        Without a doorbell, waits poll in short slices and the host finds the guest by scanning."""
        seg = Segment.attach(path)
        try:
            if seg.host_goodbye:
                raise SegmentError(f"the host of {path} has said goodbye")
            peer_id = seg.peers.attach()
        except BaseException:
            seg.close()
            raise
        link = Link(seg, peer_id, None, GUEST, spin_ns=spin_ns, owns_segment=True)
        if seg.config.heartbeat_interval_ns:
            _heartbeat_thread(link, seg.config.heartbeat_interval_ns)
        return link
