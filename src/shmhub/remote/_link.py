"""RemoteLink: the surface of a shared-memory Link over one ZeroMQ DEALER socket on TCP.

Rules:
- A ZeroMQ socket is not thread-safe: every call on it is made under the link's lock, and never
  a blocking one. A thread that must wait releases the lock and sleeps in poll() on the socket's
  ZMQ_FD, its monitor's ZMQ_FD and the link's eventfd; nothing polls on a timer while idle.
- ZMQ_FD is edge-triggered: a zmq call in one thread can consume the wake-up another thread
  sleeps on. So after each call, if a thread sleeps, ZMQ_EVENTS is read and the sleeper woken
  through the eventfd when the socket became readable (or writable) under it.
- Liveness is ZeroMQ's own heartbeat (ZMQ_HEARTBEAT_IVL/TIMEOUT): a peer that stops answering, or
  whose connection closes, shows as EVENT_DISCONNECTED on the monitor socket; the link is then
  dead (no reconnect). Frames that arrived before are still delivered (until none came for
  DRAIN_GRACE, or the peer's BYE), then PeerDead (host side) or HostGone (guest side). Our own close() is LinkClosed, and tells the peer with a BYE.
- The one algorithm is `_step` (attempt, check, mark waiting); the thread driver sleeps in poll(),
  the asyncio driver awaits the loop's readers on the same three fds."""

from __future__ import annotations

import asyncio
import math
import os
import select
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Dict, Iterable, Iterator, List, Optional, Set

import zmq
from zmq.utils.monitor import parse_monitor_message

from .._native import Message
from ..errors import HostGone, LinkClosed, LinkCorrupted, PeerDead, ShmTimeout
from . import _wire

if TYPE_CHECKING:
    from collections.abc import Buffer  # type: ignore[attr-defined]

__all__ = ["RemoteLink", "RemoteStats", "TIER", "DEFAULT_LIVENESS"]

TIER = "tcp"  # Message.tier of a payload received over a remote link
DEFAULT_LIVENESS = 1.5  # seconds without a heartbeat answer before the peer counts as dead
ZERO_COPY_MIN = 65536  # payloads this large are sent without a copy (copy=False frames)
# After the connection drops, frames already received still surface one by one: the link is gone
# once none came for this long (or at once when the peer said BYE, which follows its last frame).
DRAIN_GRACE = 0.05

MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_CLOSED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL

_AGAIN: Any = object()  # an attempt found nothing to do yet
# Plain ints: pyzmq's enum members cost an enum operation at every test on the hot path.
_EVENTS, _POLLIN, _POLLOUT, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)


class RemoteStats:
    """Counters of a remote link; stats() is them as a plain dict (as LinkStats)."""

    FIELDS = ("sent", "sent_bytes", "sent_zero_copy", "recv", "recv_bytes", "send_waits", "recv_waits")
    __slots__ = FIELDS

    def __init__(self) -> None:
        self.sent = self.sent_bytes = self.sent_zero_copy = 0
        self.recv = self.recv_bytes = 0
        self.send_waits = self.recv_waits = 0

    def as_dict(self) -> Dict[str, int]:
        return {f: getattr(self, f) for f in self.FIELDS}

    def __call__(self) -> Dict[str, int]:
        return self.as_dict()


def configure(sock: zmq.Socket[Any], liveness: float, ipv6: bool = False) -> None:
    """Options every remote socket gets: heartbeats, no drop. Reconnection stays on: with it off a
    connecting socket drops the frames it received but not yet read when the connection ends. A
    lost link stays lost all the same (the monitor's EVENT_DISCONNECTED ends it)."""
    if not liveness > 0:
        raise ValueError("liveness must be > 0 seconds")
    ms = max(1, int(liveness * 1000))
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, ms // 3))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ms)
    sock.setsockopt(zmq.HEARTBEAT_TTL, ms)
    sock.setsockopt(zmq.LINGER, 2000)
    if ipv6:
        sock.setsockopt(zmq.IPV6, 1)
    sock.setsockopt(zmq.SNDHWM, 0)  # bounded by the peer reading, as with a ring: no drop, no block
    sock.setsockopt(zmq.RCVHWM, 0)


def deadline_of(timeout: Optional[float]) -> float:
    if timeout is None:
        return math.inf
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


def _wake_all(waiters: "Set[asyncio.Future[None]]") -> None:
    for fut in list(waiters):
        if not fut.done():
            fut.set_result(None)


class RemoteLink:
    """A Link's surface over TCP (send, recv, recv_bytes, try_recv, send_many, recv_many,
    arecv/asend/async for, stats, close). Made by shmhub.connect("tcp://...") in a guest, and by
    the host's listener for each guest that connects (docs/remote.md)."""

    side: str  # "host" or "guest", as Link.side
    shared_clock = False  # the peer's CLOCK_MONOTONIC is not ours (rpc sends budgets, not deadlines)
    peer: str  # who is at the other end ("name pid at address")

    def __init__(
        self, ctx: "zmq.Context[Any]", sock: "zmq.Socket[Any]", side: str, peer: str, *, connect_deadline: float = math.inf, owns_context: bool = False
    ) -> None:
        self._ctx = ctx
        self._sock = sock
        self._mon: "zmq.Socket[Any]" = sock.get_monitor_socket(MONITOR_EVENTS)
        self._owns_context = owns_context
        self.side = side
        self.peer = peer
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # close() waits for the sleepers to leave
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._polls: List["select.poll"] = []
        self._aio: Dict[asyncio.AbstractEventLoop, Set["asyncio.Future[None]"]] = {}  # per loop (_loop_waiters)
        self._fds = (int(sock.getsockopt(zmq.FD)), int(self._mon.getsockopt(zmq.FD)), self._efd)
        self._rwait = 0  # threads asleep waiting to receive
        self._swait = 0  # ... to send
        self._closed = False
        self._released = False
        self._connected = False
        self._connect_deadline = connect_deadline  # dead if the peer's connection is not up by then
        self._gone: Optional[str] = None  # why the peer is gone
        self._bad = False  # closed, gone or lost: the fast paths step aside
        self._lost: Optional[str] = None  # the connection dropped: frames received may still surface
        self._drain_until = math.inf

    # -- state ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """The peer is connected (or still expected) and this end is open (the monitor is read
        now: an idle link's dead peer shows here too)."""
        with self._lock:
            if not self._closed:
                self._events()
            return not self._closed and self._gone is None and self._lost is None

    @property
    def gone_reason(self) -> Optional[str]:
        return self._gone

    def _gone_error(self) -> Exception:
        what = f"{self.peer}: {self._gone or self._lost}"
        return PeerDead(f"remote guest {what}") if self.side == "host" else HostGone(f"remote host {what}")

    def _mark_gone(self, reason: str) -> None:
        """Lock held."""
        if self._gone is None:
            self._gone = reason
            self._bad = True
            self._wake()  # a sleeper may be on a monitor fd another thread just drained

    def _wake(self) -> None:
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass

    def _events(self) -> None:
        """Read the monitor (lock held): connection up, lost, refused."""
        mon = self._mon
        while mon.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]  # an int; a check, not a raised zmq.Again
            parts = mon.recv_multipart(zmq.NOBLOCK)
            ev = parse_monitor_message(parts)["event"]
            if ev & zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = True
            elif ev & _HANDSHAKE_FAILED:
                self._mark_gone("the security handshake failed (wrong CURVE key?)")
            elif ev & (zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED) and self._lost is None:
                self._lost = "connection lost (closed, or no heartbeat answer)"
                self._bad = True
                self._drain_until = time.monotonic() + DRAIN_GRACE
        if self._lost is not None and time.monotonic() >= self._drain_until:
            self._mark_gone(self._lost)
        if not self._connected and self._gone is None and time.monotonic() >= self._connect_deadline:
            self._mark_gone("never connected")

    def _after(self) -> None:
        """After a zmq call (lock held): wake a sleeper whose edge this call may have consumed."""
        if self._rwait or self._swait:
            ev = int(self._sock.getsockopt(_EVENTS))
            if (self._rwait and ev & _POLLIN) or (self._swait and ev & _POLLOUT):
                self._wake()

    # -- the one algorithm, two drivers -----------------------------------------------------

    def _step(self, attempt: Callable[[], Any], receiving: bool, deadline: float) -> Any:
        """One try under the lock: the attempt's result, or _AGAIN with this thread counted as
        waiting (the caller sleeps, then calls _unwait). Raises when the link is over."""
        with self._lock:
            if self._closed:
                raise LinkClosed("link is closed")
            if receiving or (self._gone is None and self._lost is None):
                r = attempt()
                self._after()  # found or not, the call may have taken another sleeper's edge
                if r is not _AGAIN:
                    if self._lost is not None:
                        self._drain_until = time.monotonic() + DRAIN_GRACE
                    return r
            self._events()
            if self._gone is not None or (self._lost is not None and not receiving):
                if receiving:  # one last look: frames that came before the loss was seen
                    r = attempt()
                    if r is not _AGAIN:
                        return r
                raise self._gone_error()
            if time.monotonic() >= deadline:
                raise ShmTimeout("timed out waiting to " + ("receive" if receiving else "send"))
            if receiving:
                self._rwait += 1
                self.stats.recv_waits += 1
            else:
                self._swait += 1
                self.stats.send_waits += 1
            return _AGAIN

    def _unwait(self, receiving: bool, woken: bool) -> None:
        """Count this thread awake again; `woken`: the eventfd fired (drain it, unless it says the
        link is over: then it stays readable for every other sleeper)."""
        with self._lock:
            if receiving:
                self._rwait -= 1
            else:
                self._swait -= 1
            if self._closed and not (self._rwait or self._swait):
                self._idle.notify_all()
            over = self._closed or self._gone is not None
        if woken and not over:
            try:
                os.eventfd_read(self._efd)
            except OSError:
                pass  # another sleeper drained it

    def _sleep_until(self, deadline: float) -> bool:
        """Sleep until a fd fires or the deadline; True if the eventfd fired."""
        deadline = min(deadline, self._wake_by())
        rem = deadline - time.monotonic()
        try:
            p = self._polls.pop()  # one poll object per concurrent sleeper, kept for the next wait
        except IndexError:
            p = select.poll()
            for fd in self._fds:
                p.register(fd, select.POLLIN)
        try:
            events = p.poll(None if rem == math.inf else max(0, math.ceil(rem * 1000)))
        finally:
            self._polls.append(p)
        efd = self._efd
        return any(fd == efd for fd, _ in events)

    def _wake_by(self) -> float:
        """When a sleeper must look again although nothing woke it: the connect deadline, the drain's end."""
        return min(self._drain_until, math.inf if self._connected else self._connect_deadline)

    def _run(self, attempt: Callable[[], Any], receiving: bool, timeout: Optional[float]) -> Any:
        deadline = deadline_of(timeout)
        while True:
            r = self._step(attempt, receiving, deadline)
            if r is not _AGAIN:
                return r
            woken = True
            try:
                woken = self._sleep_until(deadline)
            finally:
                self._unwait(receiving, woken)

    async def _arun(self, attempt: Callable[[], Any], receiving: bool, timeout: Optional[float]) -> Any:
        deadline = deadline_of(timeout)
        loop = asyncio.get_running_loop()
        while True:
            r = self._step(attempt, receiving, deadline)
            if r is not _AGAIN:
                return r
            fut: asyncio.Future[None] = loop.create_future()
            waiters = self._loop_waiters(loop)
            waiters.add(fut)
            try:
                rem = min(deadline, self._wake_by()) - time.monotonic()
                if rem == math.inf:
                    await fut
                else:
                    await asyncio.wait([fut], timeout=max(0.0, rem))
            finally:
                waiters.discard(fut)
                if not waiters:  # the loop's last waiter on this link: its readers go
                    del self._aio[loop]
                    for fd in self._fds:
                        loop.remove_reader(fd)
                self._unwait(receiving, True)

    def _loop_waiters(self, loop: asyncio.AbstractEventLoop) -> "Set[asyncio.Future[None]]":
        """The futures of this loop's tasks waiting on the link, woken together by one reader per
        fd (a loop has one reader per fd: tasks adding their own would replace each other's)."""
        waiters = self._aio.get(loop)
        if waiters is None:
            waiters = self._aio[loop] = set()
            for fd in self._fds:
                loop.add_reader(fd, _wake_all, waiters)
        return waiters

    # -- attempts (lock held) ---------------------------------------------------------------

    def _take(self, as_bytes: bool) -> Any:
        """The next payload (a Message, or bytes), handling control messages on the way."""
        sock = self._sock
        while True:
            if not sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]  # an int; cheaper than a raised zmq.Again
                return _AGAIN
            try:
                if as_bytes:
                    data: Any = sock.recv(_NOBLOCK)
                    more = not data and sock.getsockopt(zmq.RCVMORE)
                else:
                    data = sock.recv(_NOBLOCK, copy=False)
                    more = not len(data) and data.more
            except zmq.Again:
                return _AGAIN
            if more:
                self._control(sock.recv_multipart(zmq.NOBLOCK))
                continue
            n = len(data)
            st = self.stats
            st.recv += 1
            st.recv_bytes += n
            if as_bytes:
                return data
            # A small payload is copied out of its frame (cheaper than a view); a large one is viewed.
            return Message(data.bytes if n < ZERO_COPY_MIN else data, 0, n, TIER)

    def _control(self, parts: List[bytes]) -> None:
        if len(parts) != 1:
            raise LinkCorrupted(f"remote control message of {len(parts) + 1} parts, not 2")
        c = _wire.decode(parts[0])
        if c.kind is _wire.Kind.BYE:
            self._mark_gone("closed its end" if self.side == "host" else "closed the link")
        else:
            raise LinkCorrupted(f"unexpected remote {c.kind.name} on an open link")

    def _put(self, data: Any) -> Any:
        n = len(data) if type(data) is bytes else _nbytes(data)
        try:
            if n < ZERO_COPY_MIN:
                self._sock.send(data, _NOBLOCK)
                tracker = None
            elif isinstance(data, bytes):  # immutable: zmq may keep it as it is
                self._sock.send(data, zmq.NOBLOCK, copy=False)
                tracker = None
                self.stats.sent_zero_copy += 1
            else:  # the caller may write to it once send() returns: wait until zmq is done with it
                tracker = self._sock.send(data, zmq.NOBLOCK, copy=False, track=True)
                self.stats.sent_zero_copy += 1
        except zmq.Again:
            return _AGAIN
        st = self.stats
        st.sent += 1
        st.sent_bytes += n
        return tracker

    # -- sending ----------------------------------------------------------------------------

    def send(self, data: "Buffer", timeout: Optional[float] = None) -> None:
        """Send one payload (any buffer); ShmTimeout if the peer's connection is not up in time,
        PeerDead/HostGone if it is gone, LinkClosed after close(). Large payloads go without a
        copy; send returns once the buffer may be reused."""
        tracker = _AGAIN
        with self._lock:  # the fast path: one attempt, when nothing is wrong
            if not self._bad:
                if type(data) is bytes and len(data) < ZERO_COPY_MIN:  # the common case, inline
                    try:
                        self._sock.send(data, _NOBLOCK)
                    except zmq.Again:
                        pass
                    else:
                        st = self.stats
                        st.sent += 1
                        st.sent_bytes += len(data)
                        tracker = None
                else:
                    tracker = self._put(data)
                if self._rwait or self._swait:
                    self._after()
        if tracker is _AGAIN:
            tracker = self._run(lambda: self._put(data), False, timeout)
        if tracker is not None:
            self._wait_sent(tracker, timeout)

    def _wait_sent(self, tracker: "zmq.MessageTracker", timeout: Optional[float]) -> None:
        deadline = deadline_of(timeout)
        while not tracker.done:
            # zmq frees the frame once it is on the wire: the peer's death cannot hold it past
            # the heartbeat timeout (the connection is dropped then).
            try:
                tracker.wait(1.0 if deadline == math.inf else max(0.0, min(1.0, deadline - time.monotonic())))
            except zmq.NotDone:
                if time.monotonic() >= deadline:
                    raise ShmTimeout("timed out while the payload was being sent") from None

    def try_send(self, data: "Buffer") -> bool:
        """Send if it can go at once; False otherwise (the peer's connection is not up)."""
        try:
            tracker = self._run(lambda: self._put(data), False, 0)
        except ShmTimeout:
            return False
        if tracker is not None:
            self._wait_sent(tracker, None)
        return True

    async def asend(self, data: "Buffer", timeout: Optional[float] = None) -> None:
        tracker = await self._arun(lambda: self._put(data), False, timeout)
        if tracker is not None:
            self._wait_sent(tracker, timeout)

    def send_many(self, payloads: Iterable["Buffer"], timeout: Optional[float] = None) -> int:
        """Send each payload in order; the number sent. The timeout covers the whole batch."""
        deadline = deadline_of(timeout)
        n = 0
        for p in payloads:
            self.send(p, None if deadline == math.inf else max(0.0, deadline - time.monotonic()))
            n += 1
        return n

    # -- receiving --------------------------------------------------------------------------

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The next payload as a Message (tier "tcp", a zero-copy view of the received frame)."""
        m: Message = self._fast_take(False)
        if m is _AGAIN:
            m = self._run(lambda: self._take(False), True, timeout)
        return m

    def recv_bytes(self, timeout: Optional[float] = None) -> bytes:
        with self._lock:  # the fast path, inline: a payload that is there, when nothing is wrong
            if not self._bad:
                try:
                    b: bytes = self._sock.recv(_NOBLOCK)
                except zmq.Again:
                    b = _AGAIN
                else:
                    if b or not self._sock.getsockopt(_RCVMORE):  # not a control message
                        st = self.stats
                        st.recv += 1
                        st.recv_bytes += len(b)
                        if self._rwait or self._swait:
                            self._after()
                        return b
                    self._control(self._sock.recv_multipart(_NOBLOCK))
                    b = _AGAIN
            else:
                b = _AGAIN
        if b is _AGAIN:
            b = self._run(lambda: self._take(True), True, timeout)
        return b

    def _fast_take(self, as_bytes: bool) -> Any:
        """One attempt to receive, when nothing is wrong: a payload, or _AGAIN."""
        with self._lock:
            if self._bad:
                return _AGAIN
            r = self._take(as_bytes)
            if self._rwait or self._swait:
                self._after()
            return r

    def try_recv(self) -> Optional[Message]:
        """A payload if one is there, else None (PeerDead/HostGone once the peer is gone)."""
        try:
            return self.recv(0)
        except ShmTimeout:
            return None

    def try_recv_bytes(self) -> Optional[bytes]:
        try:
            return self.recv_bytes(0)
        except ShmTimeout:
            return None

    def recv_many(self, max_count: int, timeout: Optional[float] = None) -> List[Message]:
        """Wait for one payload, then take up to max_count - 1 more that are already there."""
        if max_count < 1:
            raise ValueError("max_count must be >= 1")
        out = [self.recv(timeout)]
        while len(out) < max_count:
            with self._lock:
                if self._closed:
                    break
                m = self._take(False)
                self._after()
            if m is _AGAIN:
                break
            out.append(m)
        return out

    async def arecv(self, timeout: Optional[float] = None) -> Message:
        m: Message = await self._arun(lambda: self._take(False), True, timeout)
        return m

    async def arecv_bytes(self, timeout: Optional[float] = None) -> bytes:
        b: bytes = await self._arun(lambda: self._take(True), True, timeout)
        return b

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer is gone."""
        while True:
            try:
                yield self.recv()
            except (PeerDead, HostGone):
                return

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.arecv()
            except (PeerDead, HostGone):
                return

    def fileno(self) -> int:
        """An fd that becomes readable when the link may have news (the link's eventfd)."""
        return self._efd

    # -- closing ----------------------------------------------------------------------------

    def close(self, linger: float = 2.0) -> None:
        """Close this end: the peer gets a BYE (sent within `linger` seconds); callers blocked in
        this link raise LinkClosed. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bad = True
            if self._gone is None:
                try:
                    self._sock.send_multipart([b"", _wire.encode(_wire.Control(_wire.Kind.BYE))], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # no connection: nobody to tell
            self._wake()
            end = time.monotonic() + 5.0
            while self._rwait or self._swait:  # sleepers leave within a wake-up; then the fds go
                if not self._idle.wait(max(0.0, end - time.monotonic())):
                    break
            self._release(linger)

    def _release(self, linger: float) -> None:
        if self._released:
            return
        self._released = True
        self._sock.setsockopt(zmq.LINGER, max(0, int(linger * 1000)))
        self._sock.disable_monitor()
        self._mon.close(0)
        self._sock.close()
        os.close(self._efd)
        if self._owns_context:
            self._ctx.term()  # waits for the BYE (and anything queued) up to the linger time

    def __del__(self) -> None:
        if getattr(self, "_released", True):
            return
        # Sockets and (on a guest) a context left to the collector, as a file closed by it: say so.
        import warnings

        warnings.warn(f"unclosed {self!r}: close() it or use a with block", ResourceWarning, stacklevel=2, source=self)
        try:
            self.close(linger=0)
        except Exception:
            pass  # interpreter shutdown: zmq may be gone already

    def __enter__(self) -> "RemoteLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("gone" if self._gone else "open")
        return f"<shmhub.RemoteLink {self.side} peer={self.peer!r} {state}>"


def _nbytes(data: Any) -> int:
    if isinstance(data, (bytes, bytearray)):
        return len(data)
    with memoryview(data) as mv:
        return mv.nbytes
