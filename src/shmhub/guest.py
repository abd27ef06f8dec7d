"""The guest side: connect() inside a spawned child, connect(socket_path) for a walk-in guest that
bootstraps over the host's socket, Guest.attach() for a walk-in guest on a named segment."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable, Optional, Tuple, Union

from . import _crash, bootstrap
from .doorbell import Doorbell
from .errors import BootstrapError, BootstrapRefused, PeerCredentialsRefused, SegmentError, ShmhubError
from .link import DEFAULT_SPIN_NS, GUEST, Link
from .segment import Segment

ENV = "SHMHUB_GUEST"  # set by Host.spawn: {"v": 1, "peer_id": N, "segment_fd": N, "doorbell_fd": N, "control_fd": N}
ENV_VERSION = 1


class Handoff:
    """A guest's peer id and fds on their way into a multiprocessing child (Host.start_process).
    Pickled only while the child starts: multiprocessing passes the fds (its DupFd), and the child
    finds them as Host.spawn's children do, in the environment, so connect() works unchanged."""

    def __init__(self, peer_id: int, segment_fd: int, doorbell_fd: int, control_fd: int) -> None:
        self.peer_id, self.fds = peer_id, (segment_fd, doorbell_fd, control_fd)

    def __reduce__(self) -> Tuple[Callable[..., None], Tuple[object, ...]]:
        from multiprocessing.reduction import DupFd

        return _install, (self.peer_id, *(DupFd(fd) for fd in self.fds))


def _install(peer_id: int, *dups: object) -> None:
    seg, bell, ctrl = (d.detach() for d in dups)  # type: ignore[attr-defined]
    os.environ[ENV] = json.dumps({"v": ENV_VERSION, "peer_id": peer_id, "segment_fd": seg, "doorbell_fd": bell, "control_fd": ctrl})


def _run_target(handoff: None, target: "Callable[..., object]", args: Tuple[object, ...]) -> None:
    """The child's entry point: the handoff was unpickled (and ENV set) before this runs."""
    target(*args)


def _heartbeat_thread(link: Link, interval_ns: int) -> None:
    """Optional heartbeats (DECISIONS 14): a daemon thread stamps the peer entry while the link lives."""

    def run() -> None:
        while not link.closed and link.alive:
            if link.doorbell is not None and link.doorbell.hung_up():
                # Checked before stamping: a guest resumed after SIGSTOP may have been declared stale
                # and recovered, its peer entry reset (or handed to another guest) meanwhile.
                link._mark_dead("doorbell hang-up (the host recovered this guest, or died)")
                return
            try:
                link.segment.peers.heartbeat(link.peer_id)
            except (ValueError, ShmhubError):
                return
            time.sleep(interval_ns / 2e9)

    threading.Thread(target=run, name=f"shmhub-heartbeat-{link.peer_id}", daemon=True).start()


def connect(
    socket_path: Optional[Union[str, os.PathLike[str]]] = None,
    *,
    spin_ns: int = DEFAULT_SPIN_NS,
    timeout: Optional[float] = bootstrap.DEFAULT_TIMEOUT,
    **remote: Any,
) -> Link:
    """Return this guest's Link.

    connect(socket_path): a walk-in guest bootstraps over the host's Host.listen() socket
    (DECISIONS 17, docs/bootstrap.md); `timeout` bounds connect + request + response.
    connect(): inside a child started by Host.spawn, from the inherited fds.
    connect("tcp://HOST:PORT", **options): a remote guest (docs/remote.md): a shmhub.remote.RemoteLink."""
    if isinstance(socket_path, str) and socket_path.startswith("tcp://"):
        from .remote import connect as connect_remote  # pyzmq is optional: imported only for TCP

        return connect_remote(socket_path, timeout=timeout, **remote)  # type: ignore[return-value]
    if remote:
        raise TypeError(f"unexpected options for a Unix socket: {sorted(remote)}")
    if socket_path is not None:
        return _connect_socket(socket_path, spin_ns, timeout)
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
    return _adopt(peer_id, seg_fd, bell_fd, ctrl_fd, spin_ns, SegmentError)


def _connect_socket(socket_path: Union[str, os.PathLike[str]], spin_ns: int, timeout: Optional[float]) -> Link:
    resp = bootstrap.request(socket_path, timeout)
    if not resp.ok:
        err = PeerCredentialsRefused if resp.payload.startswith(bootstrap.CREDENTIALS_REFUSED) else BootstrapRefused
        raise err(f"the host at {os.fspath(socket_path)} refused the bootstrap: {resp.payload}")
    _crash.point(b"bootstrap.response")
    return adopt_response(resp, spin_ns)


def adopt_response(resp: bootstrap.Response, spin_ns: int = DEFAULT_SPIN_NS) -> Link:
    """The Link of a successful bootstrap response: check and take its 4 fds (all closed on failure)."""
    bell_fd, seg_fd, rx_fd, tx_fd = resp.fds  # the wire's order (format-v7 1.11)
    try:
        rx, tx = os.fstat(rx_fd), os.fstat(tx_fd)
        if (rx.st_dev, rx.st_ino) != (tx.st_dev, tx.st_ino):
            raise BootstrapError("mmap_rx and mmap_tx are different sockets; shmhub uses one control socket both ways")
        os.close(tx_fd)  # the duplicate: the Link sends and receives on rx
    except BaseException:
        resp.close()
        raise
    return _adopt(resp.peer_id, seg_fd, bell_fd, rx_fd, spin_ns, BootstrapError)


def _adopt(peer_id: int, seg_fd: int, bell_fd: int, ctrl_fd: int, spin_ns: int, err: type) -> Link:
    """Map the segment from its fd, take the doorbell and control socket, claim the reserved peer
    (Reserved -> Attached: the host reserved it, the guest claims it, for spawned and bootstrapped
    guests alike). Owns the three fds: on failure every one of them is closed."""
    seg: Optional[Segment] = None
    doorbell: Optional[Doorbell] = None
    control: Optional[socket.socket] = None
    try:
        try:
            seg = Segment.attach(seg_fd)  # attach through the fd (trap 17), sized by fstat
            _crash.point(b"bootstrap.attached")
        finally:
            os.close(seg_fd)
        if not 1 <= peer_id <= seg.config.max_guests:  # trap 16
            raise err(f"peer_id {peer_id} out of range 1..{seg.config.max_guests}")
        doorbell = Doorbell.from_fd(bell_fd)
        bell_fd = -1
        try:
            control = socket.socket(fileno=ctrl_fd)
        except OSError as e:  # not a socket at all (ENOTSOCK): the fd is still ours to close
            raise err(f"the mmap control fd is not a socket: {e.strerror}") from None
        ctrl_fd = -1
        if control.family != socket.AF_UNIX or control.type != socket.SOCK_DGRAM:
            raise err("the mmap control fd is not a Unix datagram socket")
        control.setblocking(False)
        os.set_inheritable(control.fileno(), False)
        seg.peers.claim(peer_id)
        _crash.point(b"bootstrap.claimed")
    except BaseException:
        for x in (control, doorbell, seg):
            if x is not None:
                x.close()
        for fd in (bell_fd, ctrl_fd):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        raise
    link = Link(seg, peer_id, doorbell, GUEST, control=control, spin_ns=spin_ns, owns_segment=True)
    if seg.config.heartbeat_interval_ns:
        _heartbeat_thread(link, seg.config.heartbeat_interval_ns)
    return link


class Guest:
    """Walk-in guests on a named segment."""

    @staticmethod
    def attach(path: str, *, spin_ns: int = DEFAULT_SPIN_NS, allow_uids: Iterable[int] = ()) -> Link:
        """Attach to a named segment, take an Empty peer entry, return the Link.
        Without a doorbell, waits poll in short slices and the host finds the guest by scanning.
        A segment owned by another uid raises ForeignSegment unless that uid is in allow_uids."""
        seg = Segment.attach(path, allow_uids=allow_uids)
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
