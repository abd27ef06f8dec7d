"""The host's TCP listener and the guest's connect(): the handshake that gives each guest a
RemoteLink of its own (docs/remote.md).

    guest                          listener (ROUTER on the URL, one thread)
    DEALER --- HELLO(pid, name) -->  binds a DEALER for this guest on the same address, port *
           <-- WELCOME(port) ------  (or REFUSE(reason))
    DEALER ====== payloads and BYE, heartbeats ======  the guest's DEALER  (a RemoteLink each end)
"""

from __future__ import annotations

import ipaddress
import math
import os
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple, Union
from urllib.parse import urlsplit

import zmq

from ..errors import BootstrapError, BootstrapRefused, ConfigError, ShmTimeout
from . import _wire
from ._link import _HANDSHAKE_FAILED, DEFAULT_LIVENESS, RemoteLink, configure, deadline_of

__all__ = ["Listener", "RemoteGuest", "connect", "DEFAULT_CONNECT_TIMEOUT"]

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_CONNECT_TIMEOUT = 10.0
CONNECT_GRACE = 10.0  # a guest welcomed but not connected by then is dead


def split_url(url: str) -> Tuple[str, str]:
    """("host", "port") of tcp://host:port (the port may be * or 0: any free one)."""
    u = urlsplit(url)
    if u.scheme != "tcp" or not u.netloc or ":" not in u.netloc or u.path not in ("", "/"):
        raise ConfigError(f"{url!r} is not tcp://HOST:PORT")
    host, _, port = u.netloc.rpartition(":")
    if port != "*" and not port.isdigit():
        raise ConfigError(f"{url!r}: the port must be a number or *")
    return host, port


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _load_keys(path: PathLike) -> Tuple[bytes, Optional[bytes]]:
    import zmq.auth

    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE keys from {os.fspath(path)!r}: {e}") from None
    return public, secret


class RemoteGuest:
    """A guest connected over TCP: the host's end of its link, and who it says it is. It cannot be
    signalled from here: kill() closes the link (the guest sees HostGone)."""

    peer_id: Optional[int] = None  # not in the segment's peer table
    returncode: Optional[int] = None

    def __init__(self, link: RemoteLink, pid: int, name: str, address: str) -> None:
        self.link = link
        self.pid = pid
        self.name = name
        self.address = address

    @property
    def alive(self) -> bool:
        return self.link.alive

    def kill(self) -> None:
        self.link.close(linger=0.5)

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """A remote process's exit status is not known here: None at once."""
        return None

    def __repr__(self) -> str:
        return f"<shmhub.RemoteGuest {self.name!r} pid={self.pid} at {self.address} {'alive' if self.alive else 'gone'}>"


class Listener:
    """Accepts remote guests on tcp://HOST:PORT (Host.listen("tcp://...")).

    keys: the listener's CURVE secret key file (zmq.auth.create_certificates); authorized: a
    directory of the public key files of the guests allowed in (None: any guest that knows the
    listener's public key). Without keys, HOST must be a loopback address unless public=True.
    on_guest(guest) is called (in the listener's thread) for each guest; without it, accept()."""

    def __init__(
        self,
        url: str,
        *,
        keys: Optional[PathLike] = None,
        authorized: Optional[PathLike] = None,
        public: bool = False,
        liveness: float = DEFAULT_LIVENESS,
        on_guest: Optional[Callable[[RemoteGuest], None]] = None,
    ) -> None:
        host, port = split_url(url)
        if keys is None and not public and not is_loopback(host):
            raise ConfigError(
                f"listening on {host} without CURVE keys would let anyone on the network in: pass keys= (docs/remote.md), or public=True on a trusted network"
            )
        if authorized is not None and keys is None:
            raise ConfigError("authorized= needs keys= (the listener's own CURVE keys)")
        if not liveness > 0:
            raise ConfigError("liveness must be > 0 seconds")
        self._curve = _load_keys(keys) if keys is not None else None
        self._liveness = liveness
        self._host = host
        self._on_guest = on_guest
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._auth: Any = None
        self._guests: List[RemoteGuest] = []
        self._queue: Deque[RemoteGuest] = deque()
        self._cond = threading.Condition()
        self._closed = False
        try:
            if authorized is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx)
                self._auth.start()
                self._auth.configure_curve(domain="*", location=os.fspath(authorized))
            self._router: zmq.Socket[Any] = self._socket(zmq.ROUTER)
            self._router.bind(f"tcp://{host}:{'*' if port == '0' else port}")
            self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        except BaseException:
            self._teardown()
            raise
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="shmhub-remote-listener", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self.endpoint.rpartition(":")[2])

    def _socket(self, kind: int) -> "zmq.Socket[Any]":
        s: zmq.Socket[Any] = self._ctx.socket(kind)
        configure(s, self._liveness, ipv6=":" in self._host)
        if self._curve is not None:
            s.curve_server = True
            s.curve_publickey, s.curve_secretkey = self._curve
        return s

    # -- the listener's thread --------------------------------------------------------------

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._efd, zmq.POLLIN)
        while not self._closed:
            ready = dict(poller.poll())
            if self._router in ready:
                self._answer()

    def _answer(self) -> None:
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            ident = frames[0].bytes
            try:
                if len(frames) != 3 or len(frames[1]):
                    raise ValueError(f"a handshake of {len(frames) - 1} parts")
                hello = _wire.decode(frames[2].bytes)
                if hello.kind is not _wire.Kind.HELLO:
                    raise ValueError(f"{hello.kind.name} instead of HELLO")
            except Exception as e:  # not a guest of ours: say why, keep serving
                self._reply(ident, _wire.Control(_wire.Kind.REFUSE, text=f"bad handshake: {e}"))
                continue
            address = str(frames[2].get("Peer-Address") or "?")
            try:
                guest = self._admit(hello, address)
            except Exception as e:
                self._reply(ident, _wire.Control(_wire.Kind.REFUSE, text=f"cannot admit: {e!r}"))
                continue
            self._reply(ident, _wire.Control(_wire.Kind.WELCOME, port=guest.port))
            self._hand_over(guest.guest)

    def _reply(self, ident: bytes, c: _wire.Control) -> None:
        try:
            self._router.send_multipart([ident, b"", _wire.encode(c)], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # the guest is gone already

    def _admit(self, hello: _wire.Control, address: str) -> "_Admitted":
        sock = self._socket(zmq.DEALER)
        try:
            sock.bind(f"tcp://{self._host}:*")
            port = int(sock.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
            peer = f"{hello.text or 'guest'} (pid {hello.pid}) at {address}"
            link = RemoteLink(self._ctx, sock, "host", peer, connect_deadline=time.monotonic() + CONNECT_GRACE)
        except BaseException:
            sock.close(0)
            raise
        return _Admitted(RemoteGuest(link, hello.pid, hello.text, address), port)

    def _hand_over(self, guest: RemoteGuest) -> None:
        with self._cond:
            if self._closed:
                guest.link.close(0)
                return
            self._guests.append(guest)
            if self._on_guest is None:
                self._queue.append(guest)
                self._cond.notify_all()
                return
        try:
            self._on_guest(guest)
        except Exception:
            import logging

            logging.getLogger("shmhub").exception("remote: the on_guest callback failed for %r", guest)
            guest.link.close(0)

    # -- the public API ---------------------------------------------------------------------

    def accept(self, timeout: Optional[float] = None) -> RemoteGuest:
        """The next guest that connected; ShmTimeout if none did within timeout."""
        deadline = deadline_of(timeout)
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise BootstrapError("the listener is closed")
                rem = deadline - time.monotonic()
                if rem <= 0:
                    raise ShmTimeout("no remote guest connected in time")
                self._cond.wait(None if rem == math.inf else rem)
            return self._queue.popleft()

    def guests(self) -> List[RemoteGuest]:
        """The guests connected so far and still alive."""
        with self._cond:
            return [g for g in self._guests if g.alive]

    def close(self) -> None:
        """Stop listening and close every remote guest's link (they see HostGone). Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            guests, self._guests = self._guests, []
            self._queue.clear()
            self._cond.notify_all()
        for g in guests:  # first: an on_guest callback blocked on one of them returns
            g.link.close()
        os.eventfd_write(self._efd, 1)
        self._thread.join()
        os.close(self._efd)
        self._teardown()

    def _teardown(self) -> None:
        router = getattr(self, "_router", None)
        if router is not None:
            router.close(0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<shmhub.remote.Listener {self.endpoint} guests={len(self._guests)}>"


class _Admitted:
    __slots__ = ("guest", "port")

    def __init__(self, guest: RemoteGuest, port: int) -> None:
        self.guest, self.port = guest, port


def connect(
    url: str,
    *,
    timeout: Optional[float] = DEFAULT_CONNECT_TIMEOUT,
    name: str = "",
    keys: Optional[PathLike] = None,
    server_key: Optional[PathLike] = None,
    liveness: float = DEFAULT_LIVENESS,
) -> RemoteLink:
    """A guest's link to the host listening on tcp://HOST:PORT (shmhub.connect("tcp://...")).

    keys: this guest's CURVE secret key file; server_key: the listener's public key file (both or
    neither). BootstrapRefused if the listener refuses (or the CURVE handshake fails),
    BootstrapError if no answer came within timeout."""
    host, port = split_url(url)
    if (keys is None) != (server_key is None):
        raise ConfigError("CURVE needs both keys= (this guest's) and server_key= (the listener's public key)")
    curve = None
    if keys is not None and server_key is not None:
        public, secret = _load_keys(keys)
        if secret is None:
            raise ConfigError(f"{os.fspath(keys)!r} holds no secret key")
        curve = (public, secret, _load_keys(server_key)[0])
    if not liveness > 0:
        raise ConfigError("liveness must be > 0 seconds")
    deadline = deadline_of(timeout)
    ctx: zmq.Context[Any] = zmq.Context()

    def socket() -> "zmq.Socket[Any]":
        s: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
        configure(s, liveness, ipv6=":" in host)
        if curve is not None:
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve
        return s

    try:
        welcome = _handshake(socket(), url, name, deadline)
        sock = socket()
        try:
            # The link (and its monitor) first: a handshake done before the monitor is attached goes unseen.
            link = RemoteLink(ctx, sock, "guest", url, connect_deadline=min(deadline, time.monotonic() + CONNECT_GRACE), owns_context=True)
        except BaseException:
            sock.close(0)
            raise
        try:
            sock.connect(f"tcp://{host}:{welcome}")
        except BaseException:
            link.close(0)
            raise
        return link
    except BaseException:
        ctx.term()
        raise


def _handshake(hs: "zmq.Socket[Any]", url: str, name: str, deadline: float) -> int:
    """HELLO, then WELCOME's port (the handshake socket is closed on return)."""
    mon = hs.get_monitor_socket(_HANDSHAKE_FAILED)
    try:
        hs.setsockopt(zmq.LINGER, 0)
        hs.setsockopt(zmq.RECONNECT_IVL, 100)  # the listener may not be up yet: try again until the deadline
        hs.connect(url)
        hs.send_multipart([b"", _wire.encode(_wire.Control(_wire.Kind.HELLO, pid=os.getpid(), text=name))])
        poller = zmq.Poller()
        poller.register(hs, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while True:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise BootstrapError(f"no answer from {url} in time (is a host listening there?)")
            ready = dict(poller.poll(None if rem == math.inf else max(1, math.ceil(rem * 1000))))
            if mon in ready:
                mon.recv_multipart()
                raise BootstrapRefused(f"{url} refused the CURVE handshake (wrong or unauthorized key)")
            if hs in ready:
                parts = hs.recv_multipart()
                if len(parts) != 2 or parts[0]:
                    raise BootstrapError(f"{url} answered with {len(parts)} parts: not a shmhub listener")
                c = _wire.decode(parts[1])
                if c.kind is _wire.Kind.WELCOME:
                    return c.port
                if c.kind is _wire.Kind.REFUSE:
                    raise BootstrapRefused(f"{url} refused: {c.text}")
                raise BootstrapError(f"{url} answered {c.kind.name} to HELLO")
    finally:
        hs.disable_monitor()
        mon.close(0)
        hs.close(0)
