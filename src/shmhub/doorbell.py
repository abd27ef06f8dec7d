"""Doorbells: one socketpair per guest, one byte per signal, EOF = peer dead (DECISIONS 12)."""
from __future__ import annotations

import errno
import os
import select
import socket
from typing import Optional, Tuple

from .errors import PeerDead

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_DEAD = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF)


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
        while True:
            try:
                self.sock.send(b"\x01", _SEND_FLAGS)  # MSG_NOSIGNAL: no SIGPIPE in embedders (trap 30)
                return True
            except InterruptedError:  # trap 28
                continue
            except (BlockingIOError, OSError) as e:
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS):
                    return True
                if e.errno in _DEAD or isinstance(e, (BrokenPipeError, ConnectionResetError)):
                    self.dead = True
                    return False
                raise

    def drain(self) -> int:
        """Consume pending bytes without blocking; returns how many. PeerDead on EOF (trap 28)."""
        total = 0
        while True:
            try:
                data = self.sock.recv(4096)
            except InterruptedError:
                continue
            except BlockingIOError:
                return total
            except (ConnectionResetError, OSError) as e:
                if isinstance(e, ConnectionResetError) or e.errno in _DEAD:
                    self.dead = True
                    raise PeerDead("doorbell peer is gone") from None
                raise
            if not data:
                self.dead = True
                raise PeerDead("doorbell peer closed its end (EOF)")
            total += len(data)

    def wait(self, timeout: Optional[float], wake_fd: Optional[int] = None) -> bool:
        """Sleep (GIL released) until a byte or EOF arrives, wake_fd (an eventfd of this process)
        becomes readable, or timeout passes (None: no limit); drain both. True if woken."""
        p = select.poll()
        p.register(self._fd, select.POLLIN | select.POLLRDHUP)
        if wake_fd is not None:
            p.register(wake_fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = p.poll(ms)  # PEP 475: EINTR is retried with the remaining time
        if not events:
            return False
        for fd, _ in events:
            if fd == wake_fd:
                try:
                    os.eventfd_read(wake_fd)
                except BlockingIOError:
                    pass
        self.drain()
        return True

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
