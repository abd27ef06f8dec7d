"""The host: creates the segment, spawns guests, watches them, recovers what a dead guest held."""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.process
import os
import queue
import select
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Set, Tuple, Union, cast

from . import layout as L
from ._native import Message, spin_any_readable
from . import bigmap, bootstrap
from .doorbell import Doorbell
from .errors import HostGone, LinkClosed, LinkCorrupted, PeerDead, ShmTimeout, ShmhubError
from .guest import ENV, ENV_VERSION, Handoff, _run_target
from .layout import SegmentConfig
from .link import DEFAULT_SPIN_NS, HOST, POLL_SLICE, Link, _deadline, _remaining
from .segment import Segment
from .slots import pool_stats

if TYPE_CHECKING:
    from ._native import SlotRefTuple

POOL_OP_GRACE = 0.05  # how long recovery waits for a dead guest's interrupted pool op to be decidable
# Doorbell-less peers (walk-ins on a named segment, a v7 segment without FEATURE_POOL_WAITERS) and
# heartbeats can only be watched by looking: the attention thread then scans this often. Otherwise
# it sleeps on the header's attention futex until a guest asks for something (growth, goodbye).
MONITOR_TICK = 0.01
GROWTH_RETRY = 0.5  # a failed growth (no space or memory) is retried this often while a guest's request is pending
ANY_SPIN_GUESTS = 4  # recv_any spins before sleeping only over this few guests (the scan is O(guests))
log = logging.getLogger("shmhub")
log.addHandler(logging.NullHandler())  # a library: records go where the application configures
# Host events as log records: a death or a failed growth needs attention, a failed recovery is an error.
EVENT_LEVELS = {"died": logging.WARNING, "isolated": logging.WARNING, "growth_failed": logging.WARNING, "recovery_failed": logging.ERROR}


class _AnyQueue:
    """recv_any's readiness set, O(1) per message in the number of guests: one epoll set over every
    guest's doorbell kept across calls, and a FIFO of guests that may have data. Each guest's link
    is watched (Link.fileno: its consumer flag stays announced, so the guest rings on its next
    message after we found its ring empty); a guest served goes to the back (round robin among the
    ready ones), and new readiness is collected at least once per round, so none starves."""

    def __init__(self) -> None:
        self.ep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # close() and other threads' drains
        self.ep.register(self.wake_fd, select.EPOLLIN)
        self.by_fd: Dict[int, GuestHandle] = {}
        self.ready: Deque[GuestHandle] = deque()
        self.queued: Set[GuestHandle] = set()
        self.lock = threading.Lock()
        self.served = 0  # messages since readiness was last collected
        self.polled: Set[GuestHandle] = set()  # guests without a doorbell
        self.active = False  # guests are watched from the first recv_any on (watching costs a doorbell ring per idle spell)

    def activate(self, handles: List["GuestHandle"]) -> None:
        if not self.active:
            self.active = True
            for h in handles:
                if h.link.alive:
                    self.add(h, wake=False)  # the caller collects next: it will look at them

    def add(self, h: "GuestHandle", wake: bool = True) -> None:
        """Watch a guest, and queue it: it may have sent before we watched, with its consumer flag
        down, so no doorbell will say so. `wake`: a recv_any may sleep meanwhile (the guest was
        registered by another thread, e.g. the bootstrap listener): wake it to look."""
        if h.link.doorbell is None:  # a doorbell-less walk-in: looked at on every pass, and waits are sliced
            with self.lock:
                self.polled.add(h)
                self._push(h)
        else:
            fd = h.link.fileno()  # announces the consumer flag for good
            with self.lock:
                self.by_fd[fd] = h
                self.ep.register(fd, select.EPOLLIN)
                self._push(h)
            h.link._waiter.on_drain = lambda: self.push(h)  # a thread of ours ate its doorbell byte
        if wake:
            os.eventfd_write(self.wake_fd, 1)

    def remove(self, h: "GuestHandle", fd: Optional[int]) -> None:
        with self.lock:
            self.polled.discard(h)
            if fd is not None and self.by_fd.get(fd) is h:
                del self.by_fd[fd]
                try:
                    self.ep.unregister(fd)
                except (OSError, ValueError):
                    pass

    def _push(self, h: "GuestHandle") -> None:
        if h not in self.queued:
            self.queued.add(h)
            self.ready.append(h)

    def push(self, h: "GuestHandle") -> None:
        """From any thread: h may have data (a backlog after recovery, a drained doorbell)."""
        with self.lock:
            self._push(h)
        os.eventfd_write(self.wake_fd, 1)

    def collect(self, timeout: Optional[float]) -> None:
        """Wait (GIL released) up to timeout for readiness and queue the guests that have it."""
        if self.polled:
            timeout = POLL_SLICE if timeout is None else min(timeout, POLL_SLICE)
        try:
            events = self.ep.poll(-1 if timeout is None else timeout)
        except (ValueError, OSError):
            return  # closed by Host.close() meanwhile: the caller sees the host closed
        with self.lock:
            self._queue(events)

    def _queue(self, events: Iterable[Tuple[int, int]]) -> None:
        for fd, _ in events:
            if fd == self.wake_fd:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
                continue
            h = self.by_fd.get(fd)
            if h is not None:
                self._push(h)

    def next(self) -> Optional[Tuple["GuestHandle", Message]]:
        """The next message from a ready guest, round robin, without waiting."""
        with self.lock:
            if self.served >= len(self.ready):  # a round is over: guests that became ready join it
                self.served = 0
                self._queue(self.ep.poll(0))
            for h in self.polled:
                self._push(h)
            for _ in range(2):
                for _ in range(len(self.ready)):
                    h = self.ready.popleft()
                    self.queued.discard(h)
                    msg = self._take(h.link)
                    if msg is not None:
                        self._push(h)
                        self.served += 1
                        return h, msg
                self.served = 0
                self._queue(self.ep.poll(0))
                if not self.ready:
                    break
            return None

    @staticmethod
    def _take(link: Link) -> Optional[Message]:
        """One message of a ready guest, or None (empty: its flag re-armed; gone; or another thread
        receives from it right now, which then re-queues it through on_drain)."""
        if not link._rx_lock.acquire(blocking=False):
            return None
        try:
            msg = link._poll_locked()
            if msg is None and link.alive and link.doorbell is not None:
                msg = link._rearm_locked()  # announce, drain the doorbell, look once more
            return msg
        except (PeerDead, HostGone, LinkClosed, LinkCorrupted, ValueError):
            return None  # gone and drained: not ready any more
        finally:
            link._rx_lock.release()

    def close(self) -> None:
        self.ep.close()
        os.close(self.wake_fd)


@dataclass
class HostEvent:
    """Something that happened to a guest: spawned, attached, exited (said goodbye), died, isolated
    (its shared structures failed validation: it is killed, then recovered), recovery_failed."""

    kind: str
    peer_id: int
    pid: Optional[int]
    reason: str = ""
    detail: Dict[str, int] = field(default_factory=dict)
    time_ns: int = field(default_factory=time.monotonic_ns)


@dataclass
class _Prepared:
    """A reserved peer with its doorbell and mmap-control pairs, before the guest has its ends
    (algorithms.md 2.10 prepare_peer; shared by spawn and the socket bootstrap)."""

    peer_id: int
    host_bell: Doorbell
    guest_bell: socket.socket
    host_ctrl: socket.socket
    guest_ctrl: socket.socket

    def close_guest_ends(self) -> None:
        self.guest_bell.close()
        self.guest_ctrl.close()


def _readable(fd: int, timeout: float) -> bool:
    """A pidfd is readable once its process has exited."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(timeout * 1000)))


def _peer_pidfd(conn: socket.socket) -> Tuple[int, Optional[int]]:
    """A bootstrapping guest's pid (SO_PEERCRED) and a pidfd of it, so that the host can stop it
    like a spawned guest (DECISIONS 14: a stale heartbeat; an isolated guest). The peer is connected
    and waiting for our answer, so the pid is its own (pids are not reused while it lives)."""
    try:
        pid = bootstrap.peer_credentials(conn).pid
        if pid == os.getpid():  # a guest in the host's own process: stopping it would stop the host
            return pid, None
        return pid, os.pidfd_open(pid)
    except (AttributeError, OSError):
        return 0, None  # no pidfd: it is only recovered, as a walk-in on a named segment


class _MpProcess:
    """A multiprocessing.Process with the subprocess.Popen surface the host uses. Its exit status
    is read once, under a lock: a forkserver child's status arrives on a pipe, and two threads
    reading it at once (the monitor's poll, a caller's wait) would lose it."""

    def __init__(self, proc: "multiprocessing.process.BaseProcess") -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._code: Optional[int] = None
        self.pid = proc.pid

    def poll(self) -> Optional[int]:
        with self._lock:
            if self._code is None:
                code = self._proc.exitcode
                if code is not None:
                    self._code = code
                    self._proc.close()  # its sentinel pipes, else kept until multiprocessing's next start
            return self._code

    returncode = property(poll)

    def wait(self, timeout: Optional[float] = None) -> int:
        if self._code is None:
            try:  # without the lock: the sentinel becomes readable as the child exits
                ready = bool(multiprocessing.connection.wait([self._proc.sentinel], timeout))
            except ValueError:  # closed by another thread's poll(): the status is in
                ready = True
            if ready:
                with self._lock:
                    if self._code is None:
                        self._proc.join()  # the status is there or about to be (a spawned child is reaped)
                        self._code = self._proc.exitcode
                        self._proc.close()
        if self._code is None:
            raise subprocess.TimeoutExpired(str(self._proc.name), timeout or 0.0)
        return self._code

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)  # type: ignore[arg-type]
            except ProcessLookupError:  # a forkserver's child is reaped by the forkserver
                pass


class GuestHandle:
    """The host's view of one guest."""

    def __init__(self, host: "Host", peer_id: int, link: Link, process: Optional[subprocess.Popen[Any]]) -> None:
        self.host = host
        self.peer_id = peer_id
        self.link = link
        self.process = process
        self.pidfd: Optional[int] = None
        self.walk_in_pid: Optional[int] = None  # a bootstrapped guest's pid (SO_PEERCRED): killed through pidfd
        self._pidfd_lock = threading.Lock()  # kill() against _forget closing it (the number could be reused)
        self.recovered = False
        self.stale = False  # its heartbeat went stale: being stopped and recovered
        self.isolated: Optional[str] = None  # why Host.isolate cut it off
        self._recover_lock = threading.Lock()

    @property
    def pid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else self.walk_in_pid

    @property
    def alive(self) -> bool:
        if self.recovered or not self.link.alive:
            return False
        return self.process is None or self.process.poll() is None

    def _running(self) -> bool:
        """Its process (spawned, or a bootstrapped walk-in's through its pidfd) has not exited."""
        if self.process is not None:
            return self.process.poll() is None
        fd = self.pidfd
        return fd is not None and not _readable(fd, 0)

    @property
    def returncode(self) -> Optional[int]:
        return self.process.poll() if self.process is not None else None

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        """Wait for the guest process to exit; its exit code."""
        if self.process is None:
            raise ValueError("a walk-in guest has no process handle")
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ShmTimeout(f"guest {self.peer_id} (pid {self.pid}) did not exit within {timeout} s") from None
        self.host._reaped(self.process)  # its pidfd, kept after recovery until the exit: closed now
        return code

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
        else:
            with self._pidfd_lock:
                if self.pidfd is not None:
                    try:
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                    except OSError:
                        pass  # exited already

    def _cause(self, reason: str) -> str:
        """Why recovery runs: what the host decided first (isolation, a stale heartbeat), else reason."""
        if self.isolated:
            return f"isolated: {self.isolated}"
        return "heartbeat stale" if self.stale else reason

    def __repr__(self) -> str:
        return f"<GuestHandle peer={self.peer_id} pid={self.pid} {'alive' if self.alive else 'gone'}>"


class Host:
    """Creates a segment and serves guests over it. Use as a context manager, or call close()."""

    def __init__(
        self,
        config: Optional[SegmentConfig] = None,
        path: Optional[str] = None,
        *,
        spin_ns: int = DEFAULT_SPIN_NS,
        on_event: Optional[Callable[[HostEvent], None]] = None,
    ) -> None:
        self.segment = Segment.create(config, path)
        self.spin_ns = spin_ns
        self.events: "queue.Queue[HostEvent]" = queue.Queue()
        self._event_counts: Dict[str, int] = {}
        self._counts_lock = threading.Lock()  # taken alone: _emit runs under other locks
        self._on_event = on_event
        self._lock = threading.RLock()
        self._handles: Dict[int, GuestHandle] = {}
        self._by_fd: Dict[int, GuestHandle] = {}
        self._reap_fds: Dict[int, subprocess.Popen[Any]] = {}  # pidfds of recovered guests still exiting
        self._any = _AnyQueue()
        self._spawning: Set[int] = set()  # reserved peers not yet registered: not walk-ins
        self._closed = False
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._stopping = False
        self.segment.on_grow = self._grown
        self._listener: Optional[bootstrap.Listener] = None
        self._remote: Any = None  # a shmhub.remote.Listener (listen("tcp://..."))
        self._unreaped: List[subprocess.Popen[Any]] = []  # recovered guests without a pidfd that had not exited yet
        self._isolate_lock = threading.Lock()
        self._goodbye_lock = threading.Lock()  # a leaf: recovery's _restore_goodbye against close()
        self._isolating: Deque[GuestHandle] = deque()  # walk-ins to recover, from the monitor thread
        self._futex = bool(self.segment.features & L.FEATURE_POOL_WAITERS)
        self._growth_retry_at = 0.0  # after a failed growth: not before this (no event every scan)
        self._update_share()
        self._monitor = threading.Thread(target=self._monitor_loop, name="shmhub-host-monitor", daemon=True)
        self._monitor.start()
        self._attention = threading.Thread(target=self._attention_loop, name="shmhub-host-attention", daemon=True)
        self._attention.start()

    # -- guests -----------------------------------------------------------------------------

    @property
    def guests(self) -> List[GuestHandle]:
        """Live guests, by peer id."""
        with self._lock:
            return [h for _, h in sorted(self._handles.items()) if h.alive]

    def spawn(self, argv: Sequence[str], **popen_kwargs: Any) -> GuestHandle:
        """Start a guest process: reserve a peer, hand it the segment and its doorbell, return its handle.
        Inside the child, shmhub.connect() returns its Link."""
        self._check_open()
        if popen_kwargs.get("close_fds") is False:
            raise ValueError("close_fds=False would leak other guests' doorbells into the child (trap 33)")
        pass_fds = tuple(popen_kwargs.pop("pass_fds", ()))
        env = dict(popen_kwargs.pop("env", None) or os.environ)
        p = self._prepare_peer()
        try:
            env[ENV] = json.dumps(
                {
                    "v": ENV_VERSION,
                    "peer_id": p.peer_id,
                    "segment_fd": self.segment.fd,
                    "doorbell_fd": p.guest_bell.fileno(),
                    "control_fd": p.guest_ctrl.fileno(),
                }
            )
            # pass_fds makes exactly these fds inheritable, in this child only (trap 33).
            proc = subprocess.Popen(
                list(argv), pass_fds=pass_fds + (self.segment.fd, p.guest_bell.fileno(), p.guest_ctrl.fileno()), env=env, close_fds=True, **popen_kwargs
            )
        except BaseException:
            self._abandon(p)
            raise
        finally:
            p.close_guest_ends()  # the child has its copy now (Popen returns after exec)
        handle = self._register(p, proc)
        self._emit(HostEvent("spawned", p.peer_id, proc.pid))
        return handle

    def start_process(
        self,
        target: Callable[..., object],
        args: Sequence[object] = (),
        *,
        context: Optional["multiprocessing.context.BaseContext"] = None,
        name: Optional[str] = None,
    ) -> GuestHandle:
        """Start a guest with multiprocessing: target(*args) runs in the child, where shmhub.connect()
        returns its Link. context: a spawn (default) or forkserver context; fork is refused (a
        forked child would share this process's threads' locks and every other guest's fds)."""
        self._check_open()
        ctx = context if context is not None else multiprocessing.get_context("spawn")
        method = ctx.get_start_method()
        if method not in ("spawn", "forkserver"):
            raise ValueError(f"start method {method!r} is not supported: use a 'spawn' or 'forkserver' context")
        p = self._prepare_peer()
        try:
            handoff = Handoff(p.peer_id, self.segment.fd, p.guest_bell.fileno(), p.guest_ctrl.fileno())
            proc = ctx.Process(target=_run_target, args=(handoff, target, tuple(args)), name=name)  # type: ignore[attr-defined]
            proc.start()
            # Out of multiprocessing's child list: its _cleanup() (run by every Process.start() and
            # active_children(), in any thread) polls each child without our lock, and two polls at
            # once lose the exit status (forkserver: one reads it, the other gets EOF and records 255;
            # spawn: waitpid ECHILD, never an exit). _MpProcess is the only reader.
            getattr(multiprocessing.process, "_children", set()).discard(proc)
        except BaseException:
            self._abandon(p)
            raise
        finally:
            p.close_guest_ends()  # the child has its copies once start() returned
        handle = self._register(p, _MpProcess(proc))  # type: ignore[arg-type]
        self._emit(HostEvent("spawned", p.peer_id, proc.pid))
        return handle

    def listen(
        self,
        socket_path: str,
        *,
        request_timeout: float = bootstrap.DEFAULT_REQUEST_TIMEOUT,
        allow_uids: Iterable[int] = (),
        allow_gids: Iterable[int] = (),
        **remote: Any,
    ) -> Any:
        """Accept walk-in guests on a Unix stream socket (mode 0600, DECISIONS 17, docs/bootstrap.md):
        shmhub.connect(socket_path) in another process gets a peer with its doorbell, the segment and
        its mmap control socket. A stale socket file is replaced, a live one refused. Each connection
        must deliver its request within request_timeout. close() stops listening and removes the path.
        Only peers whose SO_PEERCRED uid is our euid, in allow_uids, or whose gid is in allow_gids are
        served; an allow-list naming another user makes the socket 0666, so that it can connect at
        all (docs/guides/security.md).

        listen("tcp://HOST:PORT", **options) accepts remote guests instead and returns the
        shmhub.remote.Listener (docs/remote.md); host.close() closes it."""
        self._check_open()
        if str(socket_path).startswith("tcp://"):
            if allow_uids or allow_gids:
                raise TypeError("allow_uids and allow_gids apply to a Unix socket (SO_PEERCRED); remote guests authenticate with CURVE keys")
            from .remote import Listener  # pyzmq is optional: imported only for TCP

            with self._lock:
                if self._remote is not None:
                    raise ShmhubError(f"already listening on {self._remote.endpoint}")
                self._remote = Listener(str(socket_path), **remote)
                return self._remote
        if remote:
            raise TypeError(f"unexpected options for a Unix socket: {sorted(remote)}")
        with self._lock:
            if self._listener is not None:
                raise ShmhubError(f"already listening on {self._listener.path}")
            self._listener = bootstrap.Listener(
                socket_path, self._bootstrap_guest, request_timeout=request_timeout, allow_uids=allow_uids, allow_gids=allow_gids
            )

    @property
    def socket_path(self) -> Optional[str]:
        """Where listen() accepts guests, or None."""
        return self._listener.path if self._listener is not None else None

    def _bootstrap_guest(self, conn: socket.socket) -> None:
        """Listener thread, after a valid VSH1: prepare a peer exactly as spawn does, send VSP1 and the
        guest's 4 fds in one sendmsg, drop our copies of them, register the guest.

        Who marks the peer Attached: the guest, as a spawned child does. The host reserves it here
        (Empty -> Reserved); the guest claims it (Reserved -> Attached) once it has mapped the segment.
        A guest that dies before claiming hangs up its doorbell, and recovery resets the entry to Empty."""
        self._check_open()
        pid, pidfd = _peer_pidfd(conn)
        try:
            p = self._prepare_peer()
        except BaseException:
            if pidfd is not None:
                os.close(pidfd)
            raise
        ctrl = p.guest_ctrl.fileno()  # one DGRAM socket both ways: it is mmap_rx and mmap_tx
        try:
            bootstrap.send_response(conn, L.BOOTSTRAP_STATUS_OK, p.peer_id, self.segment.path or "", [p.guest_bell.fileno(), self.segment.fd, ctrl, ctrl])
        except BaseException:
            self._abandon(p)
            if pidfd is not None:
                os.close(pidfd)
            raise
        finally:
            p.close_guest_ends()  # the guest has its own copies now (or never will)
        with self._lock:  # "attached" is out before recovery (which needs the lock) can report the guest gone
            h = self._register(p, None, (pid, pidfd) if pidfd is not None else None)
            self._emit(HostEvent("attached", p.peer_id, h.pid))

    def _prepare_peer(self) -> _Prepared:
        """Reserve a peer (Empty -> Reserved) and make its doorbell and mmap-control pairs. The peer is
        kept out of walk-in discovery until _register or _abandon."""
        with self._lock:
            peer_id = self.segment.peers.reserve()
            self._spawning.add(peer_id)
        made: List[Union[Doorbell, socket.socket]] = []
        try:
            host_bell, guest_bell = Doorbell.pair()
            made += [host_bell, guest_bell]
            host_ctrl, guest_ctrl = bigmap.socketpair()
        except BaseException:
            for x in made:
                x.close()
            self._release_reservation(peer_id)
            raise
        return _Prepared(peer_id, host_bell, guest_bell, host_ctrl, guest_ctrl)

    def _abandon(self, p: _Prepared) -> None:
        """The guest never got its fds: close every end and release the reservation."""
        for x in (p.host_bell, p.host_ctrl):
            x.close()
        p.close_guest_ends()
        self._release_reservation(p.peer_id)

    def _release_reservation(self, peer_id: int) -> None:
        with self._lock:
            self._spawning.discard(peer_id)
            self.segment.peers.release_reserved(peer_id)

    def _register(self, p: _Prepared, proc: Optional[subprocess.Popen[Any]], walk_in: Optional[Tuple[int, int]] = None) -> GuestHandle:
        """The guest has its fds: build the host's Link and watch the doorbell (and pidfd) for death.
        walk_in: a bootstrapped guest's (pid, pidfd); the handle owns the pidfd."""
        link = Link(self.segment, p.peer_id, p.host_bell, HOST, control=p.host_ctrl, spin_ns=self.spin_ns)
        handle = GuestHandle(self, p.peer_id, link, proc)
        link.on_corrupt = lambda why: self.isolate(handle, why)
        if walk_in is not None:
            handle.walk_in_pid, handle.pidfd = walk_in
        if proc is not None:
            try:
                handle.pidfd = os.pidfd_open(proc.pid)
            except (AttributeError, OSError):
                handle.pidfd = None  # no pidfd: doorbell EOF and the monitor's poll() still notice exit
        with self._lock:
            self._spawning.discard(p.peer_id)
            self._handles[p.peer_id] = handle
            self._by_fd[p.host_bell.fileno()] = handle
            self._epoll.register(p.host_bell.fileno(), select.EPOLLRDHUP)  # hang-up only: never eats a wake byte
            if handle.pidfd is not None:
                self._by_fd[handle.pidfd] = handle
                self._epoll.register(handle.pidfd, select.EPOLLIN)
            self._update_share()
            if self._any.active:
                self._any.add(handle)
        return handle

    def _update_share(self) -> None:
        """Slot shares (FEATURE_POOL_WAITERS, docs/extensions.md): every sender leaves SLOT_SHARE_MIN
        slots of each class for every other link direction, so a guest that stops reading cannot
        take every slot from the others. The host publishes the number of directions."""
        if self._futex and not self.segment.closed:
            self.segment.region.store_u32(L.HDR_SHARE_LINKS, 2 * len(self._handles))

    def _grown(self) -> None:
        self._update_share()
        self.ring_all()

    # -- receiving from any guest -----------------------------------------------------------

    def recv_any(self, timeout: Optional[float] = None) -> Tuple[GuestHandle, Message]:
        """The next message from any guest, round-robin among the guests with data so none starves.
        O(1) per message in the number of guests (_AnyQueue); sleeps on one epoll set."""
        deadline = _deadline(timeout)
        spun = False
        self._activate_any()
        while True:
            self._check_open()
            got = self._any.next()
            if got is not None:
                return got
            rem = _remaining(deadline)
            if rem is not None and rem <= 0:
                raise ShmTimeout("no message from any guest")
            if not spun and self.spin_ns and 0 < len(self._handles) <= ANY_SPIN_GUESTS:
                spun = True  # a few guests: catch a reply about to come without a wake-up
                rings = [h.link._rx for h in list(self._handles.values()) if h.link.alive]
                budget = self.spin_ns if rem is None else min(self.spin_ns, int(rem * 1e9))
                if rings and spin_any_readable(rings, budget) >= 0:
                    for h in list(self._handles.values()):
                        self._any.push(h)
                    continue
            self._any.collect(rem)

    def _activate_any(self) -> None:
        if not self._any.active:
            with self._lock:
                self._any.activate(list(self._handles.values()))

    async def arecv_any(self, timeout: Optional[float] = None) -> Tuple[GuestHandle, Message]:
        """recv_any() for asyncio: waits on the same epoll set through the running loop (shmhub.aio)."""
        from .aio import arecv_any

        return await arecv_any(self, timeout)

    # -- death detection and recovery -------------------------------------------------------

    def _monitor_loop(self) -> None:
        """Death detection: sleeps on the doorbells' hang-ups and the guests' pidfds, no timer."""
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    while self._isolating:
                        iso = self._isolating.popleft()
                        self._recover(iso, iso._cause(""))
                    continue
                # An event may be stale: another thread (GuestHandle.wait) can close an fd after
                # epoll reported it, and a new guest's fd reuse the number. Each is re-checked.
                proc = self._reap_fds.get(fd)
                if proc is not None:  # a recovered guest has exited: collect it (no zombie)
                    if proc.poll() is not None:
                        self._reap_pidfd(fd)
                    continue
                h = self._by_fd.get(fd)
                if h is None:
                    continue
                if fd == h.pidfd:
                    if h._running():
                        continue
                    reason = "process exited"
                else:
                    if h.link.doorbell is None or not h.link.doorbell.hung_up():
                        continue
                    reason = "doorbell hang-up"
                self._recover(h, h._cause(reason))

    def _attention_loop(self) -> None:
        """Growth requests (and, where peers cannot ring, walk-ins, goodbyes and heartbeats): sleeps
        on the header's attention futex, which a guest bumps when it asks for growth or leaves."""
        seg = self.segment
        scan = not self._futex or seg.path is not None or bool(seg.config.heartbeat_interval_ns)
        while not self._stopping:
            seen = seg.region.load_u32(L.HDR_ATTENTION) if self._futex else 0
            try:
                if scan:
                    self._scan_peers()
                self._serve_growth()
                self._reap()
            except ShmhubError as e:
                self._emit(HostEvent("growth_failed", 0, None, str(e)))
            except (ValueError, OSError):
                return  # the segment was closed under us
            if self._stopping:
                return
            if self._futex:
                # A request left pending by a failed growth is retried once space may be back.
                wait = GROWTH_RETRY if self._growth_retry_at else -1
                seg.region.futex_wait(L.HDR_ATTENTION, seen, MONITOR_TICK if scan else wait)
            else:
                time.sleep(MONITOR_TICK)

    def _serve_growth(self) -> None:
        """Grow classes guests asked for, then ring every guest so waiters retry (FEATURE_EXTENTS)."""
        requests = self.segment.growth_requests()
        if not requests:
            self._growth_retry_at = 0.0  # nobody waits for growth any more
            return
        if time.monotonic() < self._growth_retry_at:
            return
        for c in requests:
            try:
                grown = self.segment.grow_class(c)
            except ShmhubError:
                self._growth_retry_at = time.monotonic() + GROWTH_RETRY
                raise
            self._growth_retry_at = 0.0
            if grown:
                self._emit(HostEvent("grown", 0, None, f"class {c}: segment is {self.segment.current_size} bytes"))

    def ring_all(self) -> None:
        """Ring every live guest's doorbell (after goodbye or growth)."""
        with self._lock:
            handles = list(self._handles.values())
        for h in handles:
            if h.link.doorbell is not None and not h.recovered:
                h.link.doorbell.ring()

    def _reap(self) -> None:
        """Collect guests without a pidfd recovered before they exited: no zombies."""
        with self._lock:
            if self._unreaped:
                self._unreaped = [p for p in self._unreaped if p.poll() is None]

    def _reaped(self, proc: subprocess.Popen[Any]) -> None:
        with self._lock:
            fds = [fd for fd, p in self._reap_fds.items() if p is proc] if self._reap_fds else []
        for fd in fds:
            self._reap_pidfd(fd)

    def _reap_pidfd(self, fd: int) -> None:
        with self._lock:
            proc = self._reap_fds.pop(fd, None)
            if proc is None:
                return  # another thread reaped it
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass
            # Closed under the lock: GuestHandle.wait (_reaped) may find it popped by the monitor
            # and return, and its caller must then see the fd gone (seen: an fd-table check raced).
            os.close(fd)
        proc.poll()

    def _scan_peers(self) -> None:
        """Walk-in guests (named segments), walk-ins that left, and stale heartbeats."""
        peers, seg = self.segment.peers, self.segment
        interval = seg.config.heartbeat_interval_ns
        for peer_id in range(1, seg.config.max_guests + 1):
            try:
                state = peers.state(peer_id)
            except (ShmhubError, ValueError):
                continue
            with self._lock:
                h = self._handles.get(peer_id)
                walk_in = (
                    seg.path is not None and state == L.PEER_ATTACHED and peer_id not in self._spawning and (h is None or h.recovered) and not self._stopping
                )
                if walk_in:
                    h = self._handles[peer_id] = GuestHandle(self, peer_id, Link(seg, peer_id, None, HOST, spin_ns=self.spin_ns), None)
                    h.link.on_corrupt = lambda why, h=h: self.isolate(h, why)
            if walk_in:
                assert h is not None  # a walk-in's handle was made above
                if self._any.active:
                    self._any.add(h)
                self._emit(HostEvent("attached", peer_id, None))
                continue
            if h is None or h.recovered:
                continue
            if h.process is None and state == L.PEER_GOODBYE:
                self._recover(h, "walk-in guest said goodbye")
            elif interval and state == L.PEER_ATTACHED and peers.is_stale(peer_id, interval):
                # DECISIONS 14: a stale heartbeat is a hung guest; stop it before touching its state.
                h.stale = True  # the monitor may see the kill first: it reports the real cause
                if h.process is not None:
                    h.kill()
                    try:
                        h.process.wait(1.0)
                    except subprocess.TimeoutExpired:
                        continue
                elif h.pidfd is not None:  # a bootstrapped walk-in: resumed, it would write into the next guest's rings
                    h.kill()
                    fd = h.pidfd  # None once the monitor recovered it meanwhile (its exit seen first)
                    if fd is not None and not _readable(fd, 1.0):
                        continue
                self._recover(h, "heartbeat stale")
            elif h.process is not None and h.pidfd is None and h.process.poll() is not None:
                self._recover(h, h._cause("process exited"))

    def isolate(self, h: GuestHandle, reason: str) -> None:
        """Cut a guest off: kill its process, then recover it as a dead guest (its slots freed, its
        peer entry reusable), and emit an "isolated" event (a WARNING). The host calls this itself
        when a receive from the guest finds its ring, a slot it sent or its mappings malformed
        (LinkCorrupted); an application may call it when its own checks fail (a payload checksum).
        Idempotent; never blocks. A guest that bootstrapped over listen() is killed through a pidfd
        of its SO_PEERCRED pid; a walk-in on a named segment cannot be stopped: it is only recovered
        (docs/guides/security.md, trust model)."""
        with self._isolate_lock:  # not self._lock: recv_any calls this holding its queue's lock, which _register takes under self._lock
            if h.isolated or h.recovered:
                return
            h.isolated = reason
        self._emit(HostEvent("isolated", h.peer_id, h.pid, reason))
        if h._running():
            # Recovered once it is gone (pidfd or doorbell hang-up, as any death): recovering a
            # live guest would hand its slots and peer entry to others while it still writes.
            h.kill()
        else:
            self._isolating.append(h)  # the caller may hold the link's rx lock, which recovery takes
            try:
                os.write(self._wake_w, b"i")
            except OSError:
                pass  # closing: close() recovers every guest

    def _recover(self, h: GuestHandle, reason: str) -> None:
        """DECISIONS 15, idempotent, never raises: Goodbye -> free slot refs in H2G -> reset rings ->
        reclaim the guest's slots -> Empty. Frames the guest committed before dying stay receivable.
        A step that fails (a guest may have scribbled over anything, docs/guides/security.md) is
        reported in a recovery_failed event; the steps after it still run."""
        with h._recover_lock:
            if h.recovered:
                return
            link, seg, pid = h.link, self.segment, h.peer_id
            said_goodbye = False
            detail: Dict[str, int] = {}
            errors: List[str] = []

            def step(key: str, fn: Callable[[], Any]) -> None:
                try:
                    n = fn()
                    if key:
                        detail[key] = n
                except Exception as e:  # never out of the host's loop
                    errors.append(f"{key or getattr(fn, '__name__', 'step')}: {type(e).__name__}: {e}")

            try:
                said_goodbye = seg.peers.state(pid) == L.PEER_GOODBYE and not h.isolated
            except (ShmhubError, ValueError, OSError):
                pass  # an unknown state a guest wrote over its entry: recovered all the same
            try:
                link._mark_dead(reason)
                with link._rx_lock, link._tx_lock:  # callers release them at once: the link is dead
                    step("", lambda: seg.peers.detach(pid))
                    step("delivered_after_death", link.drain_into_backlog)
                    step("h2g_slots_freed", lambda: self._free_inflight(pid))
                    step("", seg.h2g(pid).reset)  # after the scan (trap 20)
                    step("", seg.g2h(pid).reset)
                    step("", seg.restore_fixed)  # the guest may have written over its ring capacities, the header
                    step("", self._restore_goodbye)
                    step("", seg.refresh_extents)  # the journal and reclaim may name slots in any extent
                    step("pool_op_slots_freed", lambda: self._recover_pool_op(pid, detail))
                    step("owned_slots_freed", lambda: seg.pool.reclaim(pid))
                    step("", link._close_maps)  # the dead guest's leases go with its mappings (DECISIONS 11)
                    step("", lambda: seg.peers.reset(pid))
                    link._recovered = True
                    if seg.pool.waiters:
                        step("", seg.pool.wake_all)  # slot waiters of every process: slots came back
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
            finally:
                h.recovered = True
                self._forget(h)
            if errors:
                self._emit(HostEvent("recovery_failed", pid, h.pid, f"{reason}: {'; '.join(errors)}"))
            if link._backlog:
                self._any.push(h)  # its last frames are still to be received
            kind = "exited" if said_goodbye else "died"
            self._emit(HostEvent(kind, pid, h.pid, reason, detail))

    def _restore_goodbye(self) -> None:
        """Clear a host_goodbye the host did not store (a guest's write): else no new guest could
        stay attached. Under a lock close() stores it under, so a real goodbye is never undone."""
        with self._goodbye_lock:
            if not self._closed and self.segment.host_goodbye:
                self.segment.region.store_u32(L.HDR_HOST_GOODBYE, 0)

    def _recover_pool_op(self, peer_id: int, detail: Dict[str, int]) -> int:
        """Finish the free-list pop or push the guest died inside, if any (FEATURE_POOL_JOURNAL):
        else that slot is off every free list and never Allocated, lost for good. It can take a
        moment to decide (another guest mid-pop of the same slot); then the slot stays lost."""
        deadline = time.monotonic() + POOL_OP_GRACE
        while True:
            freed, resolved = self.segment.pool.recover_pool_op(peer_id)
            if resolved:
                return freed
            if time.monotonic() > deadline:
                detail["pool_op_unresolved"] = 1
                return 0
            time.sleep(0.0002)

    def _free_inflight(self, peer_id: int) -> int:
        """Consume the dead guest's H2G ring and free the host-owned slots in flight to it (trap 20)."""
        ring, pool, freed = self.segment.h2g(peer_id), self.segment.pool, 0
        for _ in range(ring.capacity // L.FRAME_HEADER_SIZE + 1):
            try:
                frame = ring.read_frame()
            except LinkCorrupted:
                break
            if frame is None:
                break
            if frame[0] == L.KIND_SLOT_REF:
                ref = cast("SlotRefTuple", frame)  # (kind, total_len, class_idx, extent_idx, slot_idx, generation)
                try:
                    freed += pool.free_if_current(ref[2], ref[3], ref[4], ref[5])
                except ShmhubError:
                    pass  # an out-of-range ref frees nothing
            try:
                ring.release(frame[1])
            except LinkCorrupted:
                break  # the guest wrote over the ring's indices: the reset that follows clears them
        return freed

    def _forget(self, h: GuestHandle) -> None:
        """Stop watching a recovered guest: O(1), its own fds only. A pidfd of a guest still exiting
        stays in the epoll set until the process is gone, so it is reaped without a timer."""
        bell = h.link.doorbell
        self._any.remove(h, bell.fileno() if bell is not None else None)
        with self._lock:
            for fd in (bell.fileno() if bell is not None else None, h.pidfd):
                if fd is not None and self._by_fd.get(fd) is h:
                    del self._by_fd[fd]
                    if fd != h.pidfd:
                        try:
                            self._epoll.unregister(fd)
                        except (OSError, ValueError):
                            pass
            if h.pidfd is not None:
                with h._pidfd_lock:
                    if h.process is not None and h.process.poll() is None and not self._stopping:
                        self._reap_fds[h.pidfd] = h.process  # still registered: EPOLLIN when it exits
                    else:
                        try:
                            self._epoll.unregister(h.pidfd)
                        except (OSError, ValueError):
                            pass
                        os.close(h.pidfd)
                    h.pidfd = None
            elif h.process is not None and h.process.poll() is None:
                self._unreaped.append(h.process)
            h.link._waiter.close()
            if bell is not None:
                bell.close()
            if not h.link._backlog and self._handles.get(h.peer_id) is h:
                del self._handles[h.peer_id]
            self._update_share()

    def _emit(self, ev: HostEvent) -> None:
        with self._counts_lock:
            self._event_counts[ev.kind] = self._event_counts.get(ev.kind, 0) + 1
        # After our own goodbye a guest may well exit without one of its own: no cause for alarm.
        level = logging.INFO if self._closed and ev.kind == "died" else EVENT_LEVELS.get(ev.kind, logging.INFO)
        log.log(
            level,
            "guest %d (pid %s) %s%s%s",
            ev.peer_id,
            ev.pid,
            ev.kind,
            f": {ev.reason}" if ev.reason else "",
            f" {ev.detail}" if ev.detail else "",
            extra={"shmhub_event": ev},
        )
        self.events.put(ev)
        if self._on_event is not None:
            try:
                self._on_event(ev)
            except Exception:
                pass

    def stats(self) -> Dict[str, Any]:
        """A plain-dict snapshot: events so far by kind, the slot pool per class, and per guest not yet
        forgotten its pid, this process's link counters (`link.stats()`) and its mmap-tier counters."""
        with self._counts_lock:
            events = dict(self._event_counts)
        with self._lock:
            handles = sorted(self._handles.items())
        seg = self.segment
        guests = {}
        for peer_id, h in handles:
            g: Dict[str, Any] = {"pid": h.pid, "alive": h.alive, "link": h.link.stats()}
            if seg.features & L.FEATURE_MMAP_LEASES and not h.recovered:
                g["mmap"] = seg.peers.mmap_counters(peer_id)
            guests[peer_id] = g
        return {"events": events, "guests": guests, "pool": pool_stats(seg.pool), "segment_size": seg.current_size}

    # -- lifecycle --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ShmhubError("host is closed")

    def close(self, timeout: float = 5.0) -> None:
        """Say goodbye, wake every guest, wait for them (then kill stragglers), free everything."""
        if self._closed:
            return
        self._closed = True
        if self._listener is not None:
            self._listener.close()  # no guest arrives from here on; the socket path is removed
        if self._remote is not None:
            self._remote.close()  # remote guests see HostGone
        with self._goodbye_lock:
            self.segment.say_goodbye()  # DECISIONS 13
        with self._lock:
            handles = list(self._handles.values())
        self.ring_all()
        deadline = time.monotonic() + timeout
        for h in handles:
            if h.process is not None:
                try:
                    h.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    h.process.send_signal(signal.SIGKILL)
                    h.process.wait()
            else:
                while time.monotonic() < deadline and self.segment.peers.state(h.peer_id) == L.PEER_ATTACHED:
                    time.sleep(0.005)
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._futex:
            self.segment.region.fetch_add_u32(L.HDR_ATTENTION, 1)
            self.segment.region.futex_wake(L.HDR_ATTENTION)
        os.eventfd_write(self._any.wake_fd, 1)  # threads in recv_any see the host closed
        self._monitor.join()
        self._attention.join()
        for h in handles:
            self._recover(h, "host closing")
            h.link._release_backlog()
        with self._lock:
            unreaped, self._unreaped = self._unreaped, []
            reap_fds, self._reap_fds = self._reap_fds, {}
        for fd, p in reap_fds.items():
            os.close(fd)
            unreaped.append(p)
        for p in unreaped:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._epoll.close()
        self._any.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.segment.unlink()
        self.segment.close()

    def __enter__(self) -> "Host":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
