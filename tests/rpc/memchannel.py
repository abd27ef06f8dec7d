"""An in-memory channel pair with the Link's surface (send / recv returning shmhub.Message /
close), for testing the RPC protocol without shared memory."""

from __future__ import annotations

import threading
from collections import deque
from typing import Deque, Optional, Tuple

from shmhub import Message
from shmhub.errors import LinkClosed, PeerDead, ShmTimeout


class _Pipe:
    def __init__(self) -> None:
        self.q: Deque[bytes] = deque()
        self.cond = threading.Condition()
        self.closed_by_writer = False


class MemoryChannel:
    def __init__(self, rx: _Pipe, tx: _Pipe) -> None:
        self._rx, self._tx = rx, tx
        self.closed = False
        self.sent = 0

    def send(self, data, timeout: Optional[float] = None) -> None:
        if self.closed:
            raise LinkClosed("channel closed")
        if self._tx.closed_by_writer or self._rx.closed_by_writer:
            raise PeerDead("peer closed")
        payload = bytes(memoryview(data))
        with self._tx.cond:
            self._tx.q.append(payload)
            self._tx.cond.notify_all()
        self.sent += 1

    def inject(self, data: bytes) -> None:
        """Deliver raw bytes to the *peer* of this channel, bypassing any framing (bad-input tests)."""
        with self._tx.cond:
            self._tx.q.append(bytes(data))
            self._tx.cond.notify_all()

    def recv(self, timeout: Optional[float] = None) -> Message:
        with self._rx.cond:
            while True:
                if self.closed:
                    raise LinkClosed("channel closed")
                if self._rx.q:
                    b = self._rx.q.popleft()
                    return Message(b, 0, len(b), "inline")
                if self._rx.closed_by_writer:
                    raise PeerDead("peer closed")
                if not self._rx.cond.wait(timeout):
                    raise ShmTimeout("timed out")

    def recv_bytes(self, timeout: Optional[float] = None) -> bytes:
        with self.recv(timeout) as m:
            return m.tobytes()

    def fileno(self) -> int:
        raise OSError("in-memory channel has no fd")

    def close(self) -> None:
        self.closed = True
        for p in (self._rx, self._tx):
            with p.cond:
                p.cond.notify_all()
        with self._tx.cond:
            self._tx.closed_by_writer = True
            self._tx.cond.notify_all()


def channel_pair() -> Tuple[MemoryChannel, MemoryChannel]:
    a2b, b2a = _Pipe(), _Pipe()
    return MemoryChannel(b2a, a2b), MemoryChannel(a2b, b2a)
