"""Doorbells: one socketpair per guest, one byte per signal, EOF = peer dead (DECISIONS 12)."""

from __future__ import annotations

import os
import select
import socket
from typing import Optional, Tuple

from ._native import bell_drain, bell_ring, bell_wait
from .errors import PeerDead


class Doorbell:
    """One end of a doorbell socketpair. Non-blocking and close-on-exec (trap 33)."""

    __slots__ = ("sock", "_fd", "dead")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        self.sock = sock
        self._fd = sock.fileno()
        self.dead = False

    @classmethod
    def pair(cls) -> Tuple["Doorbell", socket.socket]:
        """(host end, guest end). The guest end stays close-on-exec until handed to one child."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.setblocking(False)
        return cls(a), b

    @classmethod
    def from_fd(cls, fd: int) -> "Doorbell":
        """Adopt an inherited fd (guest side)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise PeerDead(f"doorbell fd {fd} is not a socket: {e.strerror}") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise PeerDead(f"doorbell fd {fd} is not a Unix stream socket")
        return cls(sock)

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> bool:
        """Send one byte. True if sent or already pending (EAGAIN/ENOBUFS: trap 29); False if the peer is dead."""
        if not bell_ring(self.sock.fileno()):  # fileno() is -1 once closed: EBADF, never a reused fd
            self.dead = True
            return False
        return True

    def drain(self) -> int:
        """Consume pending bytes without blocking; returns how many. PeerDead on EOF (trap 28)."""
        n = bell_drain(self.sock.fileno())  # -1 once closed: EBADF, never a reused fd
        if n < 0:
            self.dead = True
            raise PeerDead("doorbell peer is gone (EOF)")
        return n

    def wait(self, timeout: Optional[float], wake_fd: Optional[int] = None) -> bool:
        """Sleep (GIL released) until a byte or EOF arrives, wake_fd (an eventfd of this process)
        becomes readable, or timeout passes (None: no limit); drain both. True if woken; PeerDead
        on EOF. One call into the core: poll and drain cost a sleeper no Python per wake."""
        fd = self.sock.fileno()
        r = bell_wait(fd, -1 if wake_fd is None else wake_fd, timeout) if fd >= 0 else -1
        if r < 0:
            self.dead = True
            raise PeerDead("doorbell peer is gone (EOF)")
        return r > 0

    def hung_up(self) -> bool:
        """Whether the peer closed its end (checked without blocking or eating a wake byte)."""
        if self.dead:
            return True
        p = select.poll()
        p.register(self._fd, select.POLLRDHUP)
        if any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in p.poll(0)):
            self.dead = True
        return self.dead

    def close(self) -> None:
        self.sock.close()
