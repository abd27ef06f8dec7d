"""shmhub over TCP: the same Link surface, RPC and Executor across machines, on ZeroMQ (pyzmq).

    remote = host.listen("tcp://127.0.0.1:5555")      # the host: a Listener
    guest = remote.accept(timeout=5)                   # a RemoteGuest; guest.link is a RemoteLink
    link = shmhub.connect("tcp://127.0.0.1:5555")      # in the remote guest

This package sits beside link: it imports only errors and the core's Message, so host and guest
may import it (lazily: pyzmq is the optional extra shmhub[remote])."""

from __future__ import annotations

try:
    import zmq  # noqa: F401
except ImportError:  # pragma: no cover - the optional extra
    raise ImportError("shmhub.remote needs pyzmq: pip install 'shmhub[remote]'") from None

from ._link import DEFAULT_LIVENESS, RemoteLink, RemoteStats
from ._listen import Listener, RemoteGuest, connect

__all__ = ["DEFAULT_LIVENESS", "Listener", "RemoteGuest", "RemoteLink", "RemoteStats", "connect"]
