"""A Link joins the host and one guest: send / recv over the pair's two rings, payloads routed
inline or by slot reference, spin-then-sleep waits on the pair's doorbell."""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Deque, Optional

from . import layout as L
from ._native import Message, Ring
from .doorbell import Doorbell
from .errors import (
    HostGone,
    LinkClosed,
    LinkCorrupted,
    PayloadTooLarge,
    PeerDead,
    ShmTimeout,
    SlotError,
)
from .segment import Segment

HOST = "host"
GUEST = "guest"

# Spin window before sleeping. Waking a sleeping process costs ~50 us here, so a reply that comes
# within this window is caught without any syscall (issue 3, measured in benchmarks/).
DEFAULT_SPIN_NS = 50_000
# Slot exhaustion can be relieved by any process freeing a slot, not only our peer, so slot waits
# sleep in bounded slices and re-try (DECISIONS 10: backpressure, never a busy spin).
SLOT_WAIT_SLICE = 0.001
# Without a doorbell (walk-in guests) waits poll in slices this long.
POLL_SLICE = 0.0005


@dataclass
class LinkStats:
    """Counters of one link end (this process's view)."""

    sent_inline: int = 0
    sent_slot: int = 0
    sent_bytes_inline: int = 0
    sent_bytes_slot: int = 0
    recv_inline: int = 0
    recv_slot: int = 0
    recv_bytes_inline: int = 0
    recv_bytes_slot: int = 0
    ring_full_waits: int = 0
    slot_exhaustion_waits: int = 0
    recv_waits: int = 0
    doorbells_rung: int = 0
    doorbells_elided: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _deadline(timeout: Optional[float]) -> Optional[float]:
    if timeout is None:
        return None
    if timeout < 0:
        raise ValueError("timeout must be >= 0 or None")
    return time.monotonic() + timeout


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else deadline - time.monotonic()


class _Waiter:
    """Serialises sleeping on one doorbell within a process (DECISIONS 12, trap 32): one thread
    polls and drains the fd; the others wait on a condition and all re-check their predicates
    whenever the poller wakes, so no thread eats another's wakeup."""

    def __init__(self, doorbell: Optional[Doorbell]) -> None:
        self.doorbell = doorbell
        self.cond = threading.Condition(threading.Lock())
        self.polling = False
        self.gen = 0

    def try_begin(self) -> bool:
        with self.cond:
            if self.polling:
                return False
            self.polling = True
            return True

    def end(self) -> None:
        with self.cond:
            self.polling = False
            self.gen += 1
            self.cond.notify_all()

    def sleep(self, timeout: Optional[float]) -> None:
        """Sleep until woken or timeout; the caller re-checks everything afterwards."""
        with self.cond:
            if self.polling:
                gen = self.gen
                self.cond.wait_for(lambda: self.gen != gen, timeout)
                return
            self.polling = True
        try:
            if self.doorbell is None:
                time.sleep(POLL_SLICE if timeout is None else max(0.0, min(timeout, POLL_SLICE)))
            else:
                self.doorbell.wait(timeout)
        finally:
            self.end()

    def wake_all(self) -> None:
        with self.cond:
            self.gen += 1
            self.cond.notify_all()


class Link:
    """One end of a host-guest pair; the same class on both ends. Thread-safe: one lock per direction.

    send() takes any bytes-like object; recv() returns a Message (zero-copy for slot payloads).
    """

    def __init__(self, segment: Segment, peer_id: int, doorbell: Optional[Doorbell], side: str,
                 *, spin_ns: int = DEFAULT_SPIN_NS, owns_segment: bool = False) -> None:
        if side not in (HOST, GUEST):
            raise ValueError(f"side must be {HOST!r} or {GUEST!r}")
        self.segment = segment
        self.peer_id = peer_id
        self.side = side
        self.doorbell = doorbell
        self.spin_ns = spin_ns
        self.stats = LinkStats()
        self._owns_segment = owns_segment
        self._owner = L.HOST_OWNER if side == HOST else peer_id
        self._tx: Ring = segment.h2g(peer_id) if side == HOST else segment.g2h(peer_id)
        self._rx: Ring = segment.g2h(peer_id) if side == HOST else segment.h2g(peer_id)
        self._pool = segment.pool
        self._region = segment.region
        cfg = segment.config
        self._max_payload = cfg.max_payload_size
        self._inline_max = segment.inline_threshold
        self._slot_max = max(s for s, _ in cfg.size_classes) - L.SLOT_LEN_PREFIX
        self._elide = bool(segment.features & L.FEATURE_WAITER_FLAGS) and doorbell is not None
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._waiter = _Waiter(doorbell)
        self._backlog: Deque[Message] = deque()
        self._dead: Optional[str] = None
        self._recovered = False  # host side: the peer entry may be reused, never touch its rings again
        self._corrupt: Optional[str] = None
        self._closed = False

    # -- state ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        return not (self._closed or self._dead or self._corrupt)

    def fileno(self) -> int:
        """The doorbell fd: readable when the peer signals (for selectors / event loops)."""
        if self.doorbell is None:
            raise OSError("this link has no doorbell (walk-in guest)")
        return self.doorbell.fileno()

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason
        self._waiter.wake_all()

    def _gone_error(self) -> Exception:
        if self.side == GUEST:
            return HostGone(f"host is gone ({self._dead})") if self._dead else HostGone("host said goodbye")
        return PeerDead(f"guest {self.peer_id} is gone ({self._dead})")

    def _check(self) -> None:
        """Raise if the link can no longer carry messages (checked before every blocking step)."""
        if self._closed:
            raise LinkClosed("link is closed")
        if self._corrupt:
            raise LinkCorrupted(self._corrupt)
        if self.doorbell is not None and self.doorbell.dead and not self._dead:
            self._dead = "doorbell EOF"
        if self._dead or (self.side == GUEST and self.segment.host_goodbye):  # DECISIONS 13
            raise self._gone_error()

    def _corrupted(self, e: Exception) -> LinkCorrupted:
        self._corrupt = f"link to peer {self.peer_id} is corrupted: {e}"  # DECISIONS 6: terminal
        self._waiter.wake_all()
        return e if isinstance(e, LinkCorrupted) else LinkCorrupted(self._corrupt)

    # -- waking the peer --------------------------------------------------------------------

    def _notify(self, producer_side: bool, ring: Ring) -> None:
        """After publishing: ring the doorbell unless the peer announced it is awake."""
        if self.doorbell is None:
            return
        if self._elide and not ring.peer_waiting(producer_side):
            self.stats.doorbells_elided += 1
            return
        self.stats.doorbells_rung += 1
        if not self.doorbell.ring():
            self._mark_dead("doorbell peer closed")

    # -- waiting ----------------------------------------------------------------------------

    def _wait(self, attempt, ring: Ring, producer: bool, deadline: Optional[float], spin, slice_cap=None):
        """Spin, then sleep on the doorbell until attempt() succeeds (returns neither None nor False;
        a zero-length Message is falsy but a success)."""
        r = attempt()
        if r is not None and r is not False:
            return r
        if spin is not None and self.spin_ns:
            budget = self.spin_ns
            rem = _remaining(deadline)
            if rem is not None:
                budget = min(budget, max(0, int(rem * 1e9)))
            if spin(budget):
                r = attempt()
                if r is not None and r is not False:
                    return r
        while True:
            r = self._check_waiting(attempt, producer)
            if r is not None and r is not False:
                return r
            rem = _remaining(deadline)
            if rem is not None and rem <= 0:
                raise ShmTimeout("timed out")
            if slice_cap is not None:
                rem = slice_cap if rem is None else min(rem, slice_cap)
            ring.set_waiting(producer, 1)
            try:
                r = attempt()  # re-check after announcing (no lost wakeup)
                if r is not None and r is not False:
                    return r
                r = self._check_waiting(attempt, producer)
                if r is not None and r is not False:
                    return r
                try:
                    self._waiter.sleep(rem)
                except PeerDead as e:
                    self._mark_dead(str(e))
            finally:
                ring.set_waiting(producer, 0)
            r = attempt()
            if r is not None and r is not False:
                return r

    def _check_waiting(self, attempt, producer: bool):
        """_check() inside a wait. A receiver that finds the peer gone looks once more before it
        raises: the peer may have committed frames after this thread's last look and then died
        (or said goodbye); it can write nothing more, so one more look sees all it left, and recv
        delivers that before PeerDead / HostGone. Returns attempt()'s result, or None."""
        try:
            self._check()
        except (PeerDead, HostGone):
            if not producer:
                r = attempt()
                if r is not None and r is not False:
                    return r
            raise
        return None

    @staticmethod
    def _lock(lock: threading.Lock, deadline: Optional[float]) -> None:
        rem = _remaining(deadline)
        if not lock.acquire(timeout=-1 if rem is None else max(0.0, rem)):
            raise ShmTimeout("timed out waiting for another thread using this link")

    # -- send -------------------------------------------------------------------------------

    def send(self, data, timeout: Optional[float] = None) -> None:
        """Send a bytes-like object. Blocks (spin, then sleep) while the ring or pool is full."""
        mv = memoryview(data)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        n = mv.nbytes
        if n > self._max_payload:
            raise PayloadTooLarge(f"payload of {n} bytes exceeds max_payload_size {self._max_payload}")
        if n > self._inline_max and n > self._slot_max:
            raise PayloadTooLarge(f"payload of {n} bytes exceeds the largest slot payload ({self._slot_max} bytes); "
                                  "payloads above it need the mmap tier, which this version does not provide")
        deadline = _deadline(timeout)
        self._lock(self._tx_lock, deadline)
        try:
            self._check()
            tx = self._tx
            if n <= self._inline_max:
                size = (L.FRAME_HEADER_SIZE + n + 3) & ~3
                if not tx.write_inline(mv):
                    self.stats.ring_full_waits += 1
                    self._wait(lambda: tx.write_inline(mv), tx, True, deadline, lambda b: tx.spin_room(size, b))
                self.stats.sent_inline += 1
                self.stats.sent_bytes_inline += n
            else:
                self._send_slot(mv, n, deadline)
            self._notify(False, tx)
        finally:
            self._tx_lock.release()

    def _send_slot(self, mv, n: int, deadline: Optional[float]) -> None:
        pool, tx = self._pool, self._tx
        ref = pool.alloc(n + L.SLOT_LEN_PREFIX, self._owner)
        if ref is None:
            self.stats.slot_exhaustion_waits += 1
            ref = self._wait(lambda: pool.alloc(n + L.SLOT_LEN_PREFIX, self._owner), tx, True, deadline, None, SLOT_WAIT_SLICE)
        c, s, gen = ref
        try:
            pool.write_payload(c, s, mv)
            if not tx.write_slot_ref(c, 0, s, gen):
                self.stats.ring_full_waits += 1
                self._wait(lambda: tx.write_slot_ref(c, 0, s, gen), tx, True, deadline,
                           lambda b: tx.spin_room(L.SLOT_REF_FRAME_SIZE, b))
        except BaseException:
            pool.free_if_current(c, 0, s, gen, self._owner)  # never committed: still ours to free
            raise
        self.stats.sent_slot += 1
        self.stats.sent_bytes_slot += n

    # -- receive ----------------------------------------------------------------------------

    def _free_slot(self, c: int, e: int, s: int, gen: int) -> None:
        self._pool.free_if_current(c, e, s, gen, self._owner)
        if not self._closed and not self._dead and self.doorbell is not None:
            # The producer may sleep waiting for a slot (trap 27).
            if not self._elide or self._rx.peer_waiting(True):
                self.doorbell.ring()

    def _take_frame(self, frame) -> Message:
        """Turn a ring frame into a Message and release its ring bytes (rx lock held)."""
        rx = self._rx
        kind = frame[0]
        if kind == L.KIND_INLINE:
            payload = frame[2]
            rx.release(frame[1])
            self.stats.recv_inline += 1
            self.stats.recv_bytes_inline += len(payload)
            return Message(payload, 0, len(payload), "inline")
        if kind == L.KIND_SLOT_REF:
            _, total, c, e, s, gen = frame
            try:
                # DECISIONS 9: become the owner before exposing the data (and before releasing the ring bytes).
                n = self._pool.take(c, e, s, gen, self._owner)
                off = self._pool.payload_offset(c, s)
            except SlotError as err:
                raise self._corrupted(err) from None
            rx.release(total)
            self.stats.recv_slot += 1
            self.stats.recv_bytes_slot += n
            return Message(self._region, off, n, "slot", lambda: self._free_slot(c, e, s, gen))
        raise self._corrupted(LinkCorrupted("mmap-ref frame received, but this link has no mmap tier"))

    def _poll_locked(self) -> Optional[Message]:
        if self._backlog:
            return self._backlog.popleft()
        if self._closed or self._corrupt or self._recovered:
            self._check()
        try:
            frame = self._rx.read_frame()
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        if frame is None:
            return None
        msg = self._take_frame(frame)
        self._notify(True, self._rx)  # a producer may wait for space (trap 27)
        return msg

    def try_recv(self) -> Optional[Message]:
        """The next message if one is there now, else None (raises if the link is gone and empty)."""
        with self._rx_lock:
            msg = self._poll_locked()
            if msg is None and not self.alive:
                self._check()
            if msg is None and self.side == GUEST and self.segment.host_goodbye:
                self._check()
            return msg

    def recv(self, timeout: Optional[float] = None) -> Message:
        """The next message; blocks (spin, then sleep) up to timeout. Messages already in the ring
        are delivered before PeerDead / HostGone is raised."""
        deadline = _deadline(timeout)
        self._lock(self._rx_lock, deadline)
        try:
            msg = self._poll_locked()
            if msg is None:
                self.stats.recv_waits += 1
                msg = self._wait(self._poll_locked, self._rx, False, deadline, self._rx.spin_readable)
            return msg
        finally:
            self._rx_lock.release()

    def recv_bytes(self, timeout: Optional[float] = None) -> bytes:
        """The next message copied into bytes (its shared memory is released at once)."""
        with self.recv(timeout) as msg:
            return msg.tobytes()

    def __iter__(self):
        """Messages until the peer is gone."""
        while True:
            try:
                yield self.recv()
            except (PeerDead, LinkClosed):
                return

    # -- teardown ---------------------------------------------------------------------------

    def drain_into_backlog(self) -> int:
        """Host recovery: take every complete frame left in the ring so recv() still returns
        it after the peer died. Call with the rx lock held."""
        count = 0
        while True:
            try:
                frame = self._rx.read_frame()
                if frame is None:
                    return count
                self._backlog.append(self._take_frame(frame))
            except (LinkCorrupted, SlotError):
                return count
            count += 1

    def close(self) -> None:
        """Close this end. A guest says goodbye to the host; blocked callers get LinkClosed."""
        if self._closed:
            return
        self._closed = True
        self._waiter.wake_all()
        if self.side == GUEST:
            with self._tx_lock, self._rx_lock:
                try:
                    self.segment.peers.detach(self.peer_id)
                except (ValueError, OSError):
                    pass
                self._release_backlog()
                if self.doorbell is not None:
                    self.doorbell.close()
                if self._owns_segment:
                    self.segment.close()

    def _release_backlog(self) -> None:
        while self._backlog:
            try:
                self._backlog.popleft().release()
            except BufferError:
                pass

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("dead" if self._dead else "corrupted" if self._corrupt else "open")
        return f"<Link {self.side} peer={self.peer_id} {state}>"


__all__ = ["Link", "LinkStats", "Message", "HOST", "GUEST", "DEFAULT_SPIN_NS"]
