"""A Link joins the host and one guest: send / recv over the pair's two rings, payloads routed
inline or by slot reference, spin-then-sleep waits on the pair's doorbell."""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, Iterator, List, Literal, Optional, Sequence, Set, Tuple, TypeVar, Union, cast, overload
from warnings import warn as _warn  # bound now: usable from __del__ at shutdown

from . import layout as L
from ._native import FastLock, LinkCore, LinkStats, Message, NeedExtent, Ring, SlotShares, buffer_address, recv_next, send_slot
from .bigmap import MapReceiver, MapSender, Mapping, holding
from .doorbell import Doorbell
from .errors import (
    HostGone,
    LinkClosed,
    LinkCorrupted,
    PayloadTooLarge,
    PeerDead,
    ResourceExhausted,
    SegmentCorrupted,
    ShmTimeout,
    SlotError,
)
from .segment import Segment

if TYPE_CHECKING:
    import numpy.typing as npt
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

    from ._native import FrameTuple, MmapRefTuple, SlotRefParts, SlotRefTuple
    from .aio import LinkIterator

HOST = "host"
GUEST = "guest"

# Spin window before sleeping. Waking a sleeping process costs ~50 us here, so a reply that comes
# within this window is caught without any syscall (issue 3, measured in benchmarks/). The window
# adapts per link (LinkCore.spin_budget): after a few spins in a row that caught nothing, waits sleep
# at once (with a probe now and then) until a spin pays again.
DEFAULT_SPIN_NS = 50_000
# A v7 segment without FEATURE_POOL_WAITERS has no futex words: slot waits there poll in slices
# (DECISIONS 10: backpressure, never a busy spin).
SLOT_WAIT_SLICE = 0.001
# Without a doorbell (walk-in guests) waits poll in slices this long.
POLL_SLICE = 0.0005
# A guest asleep on a slot futex is woken by frees and by the host's recovery, but a host that dies
# wakes nobody: the guest looks at its doorbell for the hang-up this often while it waits.
HOST_DEATH_CHECK = 1.0
# With one CPU the peer never runs while we spin. (Our own affinity says nothing: a process pinned to
# one core spins usefully while its peer runs on another.)
SPIN_ALLOWED = (os.cpu_count() or 1) > 1
_T = TypeVar("_T")
_EXHAUSTED = object()  # _take_slot: a share wait found the pool exhausted instead


def _as_bytes(msg: Message) -> bytes:
    with msg:
        return msg.tobytes()


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
        self._efd: Optional[int] = None  # made at the first sleep: wake_all() (close, death) writes it
        self.on_drain: Optional[Callable[[], None]] = None  # Host.recv_any: we may have eaten its wake byte
        self._finalizer: Optional[weakref.finalize[[int], _Waiter]] = None
        self._closed = False  # the link is torn down: sleeps return at once (the caller re-checks)
        # `with self.mutex` is `with self.cond` minus a Python-level call each way (per wake-up)
        self.mutex = threading.Lock()
        self.cond = threading.Condition(self.mutex)
        self.sleepers = 0  # threads in cond.wait_for: notify_all() only if one is there
        self.polling = False
        self.poller = 0  # the polling thread's ident (an event loop's thread while asyncio polls)
        self.gen = 0
        self.wakers: Set[Callable[[], None]] = set()  # asyncio sleeps (aio.py): thread-safe callables run by wake_all()
        self.async_poll = False  # an event loop polls the doorbell now; its reader wakes every waiter
        self._announced: Dict[Tuple[int, bool], int] = {}  # (ring, producer side) -> waiters of this process that set the flag

    def try_begin(self) -> bool:
        with self.mutex:
            if self.polling:
                return False
            self.polling = True
            self.poller = threading.get_ident()
            return True

    def end(self) -> None:
        with self.mutex:
            self.polling = False
            self.poller = 0
            self.gen += 1
            if self.sleepers:
                self.cond.notify_all()

    def sleep(self, timeout: Optional[float], token: Optional[int] = None) -> None:
        """Sleep until woken or timeout; the caller re-checks everything afterwards. `token` is
        `gen` as read before the caller's last check: if a poller has drained the doorbell since
        then, the byte may have been the caller's wakeup, so return at once."""
        me = threading.get_ident()
        with self.mutex:
            gen = self.gen if token is None else token
            if self.gen != gen:
                return
            beside = self.polling and self.poller == me
            if self.polling and not beside:
                self.sleepers += 1
                try:
                    self.cond.wait_for(lambda: self.gen != gen, timeout)
                finally:
                    self.sleepers -= 1
                return
            if not beside:
                self.polling, self.poller = True, me
        # beside: the poller is an event loop of this very thread, suspended under a blocking call
        # made in one of its coroutines: it cannot wake us, so we poll beside it.
        try:
            if self.doorbell is None:
                time.sleep(POLL_SLICE if timeout is None else max(0.0, min(timeout, POLL_SLICE)))
            elif self._closed:
                return
            elif self.doorbell.wait(timeout, self._wake_fd()) and self.on_drain is not None:
                self.on_drain()
        finally:
            if beside:
                self.wake_all(efd=False)  # its waiters re-check: we may have drained their byte
            else:
                self.end()

    def _wake_fd(self) -> Optional[int]:
        """An eventfd beside the doorbell: the peer is the only one who can make the doorbell readable,
        so close() and death in this process wake the poller through this fd instead (no timer)."""
        if self._efd is not None:
            return self._efd
        with self.mutex:
            if self._efd is None and not self._closed:
                try:
                    self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                except OSError as e:  # EMFILE at the first wait: typed, nothing consumed, retry later
                    raise ResourceExhausted(e.errno, f"cannot wait: no fd for the waiter's eventfd: {e.strerror}") from None
                self._finalizer = weakref.finalize(self, os.close, self._efd)
            return self._efd

    def wake_all(self, efd: bool = True) -> None:
        with self.mutex:
            self.gen += 1
            if self.sleepers:
                self.cond.notify_all()
            if efd and self._efd is not None and self.polling:
                os.eventfd_write(self._efd, 1)
        for wake in tuple(self.wakers):
            wake()

    def close(self) -> None:
        """Close the wake fd (no thread sleeps on this doorbell any more)."""
        with self.mutex:
            self._closed = True
            if self._finalizer is not None:
                self._finalizer()
            self._efd = self._finalizer = None

    def announce(self, ring: Ring, producer: bool) -> int:
        """Set the ring's waiting flag (store + fence) for one more waiter of this process. Counted: a
        thread and an asyncio task may wait on one flag, which drops only when the last one withdraws.
        Returns `gen`, the token for sleep()."""
        key = (id(ring), producer)
        with self.mutex:
            ring.set_waiting(producer, 1)
            self._announced[key] = self._announced.get(key, 0) + 1
            return self.gen

    def withdraw(self, ring: Ring, producer: bool) -> None:
        key = (id(ring), producer)
        with self.mutex:
            n = self._announced.pop(key, 1) - 1
            if n > 0:
                self._announced[key] = n
                return
            try:
                ring.set_waiting(producer, 0)
            except ValueError:
                pass  # the segment was closed meanwhile: the link is closed


class Link(LinkCore):
    """One end of a host-guest pair; the same class on both ends. Thread-safe: one lock per direction.

    send() takes any bytes-like object; recv() returns a Message (zero-copy for slot payloads).
    The per-message fast paths (send, recv, recv_bytes, try_recv*, reserve, send_reserved) are LinkCore's,
    in the compiled core; they fall back to the methods here for everything but the common case.
    """

    def __init__(
        self,
        segment: Segment,
        peer_id: int,
        doorbell: Optional[Doorbell],
        side: str,
        *,
        control: Optional[socket.socket] = None,
        spin_ns: int = DEFAULT_SPIN_NS,
        owns_segment: bool = False,
    ) -> None:
        if side not in (HOST, GUEST):
            raise ValueError(f"side must be {HOST!r} or {GUEST!r}")
        self.segment = segment
        self.peer_id = peer_id
        self.side = side
        self.doorbell = doorbell
        self.spin_ns = spin_ns
        self.stats = LinkStats()
        self._hdr = segment.region
        self._is_guest = side == GUEST
        self._epoch = segment.peers.epoch(peer_id) if side == GUEST else 0  # whose entry close() may leave
        self._has_bell = doorbell is not None
        self._owns_segment = owns_segment
        self._owner = L.HOST_OWNER if side == HOST else peer_id
        self._tx: Ring = segment.h2g(peer_id) if side == HOST else segment.g2h(peer_id)
        self._rx: Ring = segment.g2h(peer_id) if side == HOST else segment.h2g(peer_id)
        self._pool = segment.pool
        cfg = segment.config
        self._max_payload = cfg.max_payload_size
        self._inline_max = segment.inline_threshold
        self._slot_max = cfg.max_slot_payload
        self._fast_max = min(self._slot_max, self._max_payload)  # the hot path skips _check_size
        self._elide = bool(segment.features & L.FEATURE_WAITER_FLAGS) and doorbell is not None
        self._control = control
        self._maps_tx: Optional[MapSender] = None
        self._maps_rx: Optional[MapReceiver] = None
        if control is not None and segment.features & L.FEATURE_MMAP_LEASES:
            self._maps_tx, self._maps_rx = MapSender(control), MapReceiver(control)
        entry = segment.layout.peer_entry_offset(peer_id)
        tx_fields = (L.PEER_H2G_MAPPINGS, L.PEER_H2G_MAPPED_KIB, L.PEER_H2G_LEASES)
        rx_fields = (L.PEER_G2H_MAPPINGS, L.PEER_G2H_MAPPED_KIB, L.PEER_G2H_LEASES)
        if side == GUEST:
            tx_fields, rx_fields = rx_fields, tx_fields
        self._tx_counters = tuple(entry + f for f in tx_fields)  # for inspect (FEATURE_MMAP_LEASES)
        self._rx_leases = entry + rx_fields[2]
        if segment.features & L.FEATURE_POOL_WAITERS:  # the slot share (docs/extensions.md, bit 4)
            self._shares = SlotShares(self._pool, segment.region)
        if not SPIN_ALLOWED:
            self.spin_ns = 0
        self._tx_lock = FastLock()
        self._rx_lock = FastLock()
        self._on_slot_free = self._slot_freed
        self._waiter = _Waiter(doorbell)
        self._backlog: Deque[Message] = deque()
        self._dead: Optional[str] = None
        self._recovered = False  # host side: the peer entry may be reused, never touch its rings again
        self._corrupt: Optional[str] = None
        self.on_corrupt: Optional[Callable[[str], None]] = None  # the host's isolation (Host._isolate)
        self._closed = False
        self._ok = True  # not closed, dead or corrupted: the hot paths check only this
        self._watched = False  # fileno() was called: keep the receive side announced (see fileno)

    # -- state ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        return not (self._closed or self._dead or self._corrupt)

    def fileno(self) -> int:
        """The doorbell fd, for selectors / event loops: readable when a message may have arrived.
        With doorbell elision the peer rings only for a receiver that announced it waits, so the
        first call announces it for good: call try_recv() until it returns None once registered
        and whenever the fd is readable; that drains the doorbell and re-arms it. (Other threads
        blocking on this link meanwhile may drain the doorbell themselves.)"""
        if self.doorbell is None:
            raise OSError("this link has no doorbell (walk-in guest)")
        if not self._watched:
            self._watched = True
            self._waiter.announce(self._rx, False)  # for good: waiters' withdraw() never clears it
        return self.doorbell.fileno()

    def prepare_wait(self) -> None:
        """Make now what this process's first blocking wait on the link would make (its wake
        eventfd): a thread that will sleep here (a reader thread) finds fd exhaustion in the
        caller that starts it, as ResourceExhausted, not later in the background."""
        if self.doorbell is not None:
            self._waiter._wake_fd()

    def _mark_dead(self, reason: str) -> None:
        self._ok = False
        first = self._dead is None
        if first:
            self._dead = reason
        self._waiter.wake_all()
        if first and self._pool.waiters and not self.segment.closed:
            self._pool.wake_all()  # a thread of ours may sleep on a slot futex (holding the tx lock)

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
            self._mark_dead("doorbell EOF")
        if self._dead or (self.side == GUEST and self.segment.host_goodbye):  # DECISIONS 13
            raise self._gone_error()

    def _corrupted(self, e: Exception) -> Exception:
        if self._is_guest and self.doorbell is not None and self.doorbell.hung_up():
            # The host recovered us (a stale heartbeat while we were SIGSTOPped) and reset our
            # rings under our cached indices: garbage to us, but the cause is the hang-up.
            self._mark_dead("doorbell hang-up (the host recovered this guest, or died)")
            return self._gone_error()
        self._ok = False
        self._corrupt = f"link to peer {self.peer_id} is corrupted: {e}"  # DECISIONS 6: terminal
        self._waiter.wake_all()
        if self.on_corrupt is not None:
            self.on_corrupt(self._corrupt)  # called with the rx lock held: it must not take it
        return e if isinstance(e, LinkCorrupted) else LinkCorrupted(self._corrupt)

    # -- waking the peer --------------------------------------------------------------------

    def _notify(self, producer_side: bool, ring: Ring) -> None:
        """After publishing: ring the doorbell unless the peer announced it is awake."""
        if self.doorbell is None:
            return
        if self._elide and not ring.claim_peer_waiting(producer_side):
            self.stats.doorbells_elided += 1
            return
        self._ring()

    def _ring(self) -> None:
        if self.doorbell is None:
            return
        self.stats.doorbells_rung += 1
        self._tx.count_doorbell()  # FEATURE_RING_COUNTERS: shmhub top shows doorbells/s
        if not self.doorbell.ring():
            self._mark_dead("doorbell peer closed")

    # -- waiting ----------------------------------------------------------------------------

    def _wait(
        self,
        attempt: Callable[[], Optional[_T]],
        ring: Ring,
        producer: bool,
        deadline: Optional[float],
        spin: Optional[Callable[[int], bool]],
        slice_cap: Optional[float] = None,
    ) -> _T:
        """Spin, then sleep on the doorbell until attempt() succeeds (returns neither None nor False;
        a zero-length Message is falsy but a success)."""
        r = attempt()
        if r is not None and r is not False:
            return r
        budget = self.spin_budget() if spin is not None else 0
        if budget and spin is not None:  # budget is 0 without spin
            rem = _remaining(deadline)
            if rem is not None:
                budget = min(budget, max(0, int(rem * 1e9)))
            ok = spin(budget)
            self.spin_result(ok)
            if ok:
                r = attempt()
                if r is not None and r is not False:
                    return r
        waiter = self._waiter
        while True:
            rem = _remaining(deadline)
            if rem is not None and rem <= 0:
                r = self._check_waiting(attempt, producer)  # a gone peer wins over the timeout
                if r is not None and r is not False:
                    return r
                raise ShmTimeout("timed out")
            if slice_cap is not None:
                rem = slice_cap if rem is None else min(rem, slice_cap)
            token = waiter.announce(ring, producer)  # gen before the re-check: a later wake is never missed
            try:
                r = attempt()  # re-check after announcing (no lost wakeup)
                if r is not None and r is not False:
                    return r
                r = self._check_waiting(attempt, producer)
                if r is not None and r is not False:
                    return r
                try:
                    waiter.sleep(rem, token)
                except PeerDead as e:
                    self._mark_dead(str(e))
            finally:
                waiter.withdraw(ring, producer)
            r = attempt()
            if r is not None and r is not False:
                return r

    def _check_waiting(self, attempt: Callable[[], Optional[_T]], producer: bool) -> Optional[_T]:
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
    def _lock(lock: FastLock, deadline: Optional[float]) -> None:
        rem = _remaining(deadline)
        if not lock.acquire(timeout=-1 if rem is None else max(0.0, rem)):
            raise ShmTimeout("timed out waiting for another thread using this link")

    # -- send -------------------------------------------------------------------------------

    def _send_slow(self, data: Buffer, timeout: Optional[float]) -> None:
        """send() when the core's fast path could not send at once: waits, the mmap tier, errors."""
        with memoryview(data) as mv:  # released even on error: a Message being sent must stay releasable
            if not mv.c_contiguous:
                return self._send_slow(mv.tobytes(), timeout)
            n = mv.nbytes
            self._check_size(n)
            deadline = _deadline(timeout)
            self._lock(self._tx_lock, deadline)
            try:
                self._check()
                self._send_locked(mv, n, deadline)
                self._notify(False, self._tx)
            except LinkCorrupted as e:
                raise self._corrupted(e) from None
            finally:
                self._tx_lock.release()

    def _check_size(self, n: int) -> None:
        if n > self._max_payload:
            raise PayloadTooLarge(f"payload of {n} bytes exceeds max_payload_size {self._max_payload}")
        if n > self._inline_max and n > self._slot_max and self._maps_tx is None:
            raise PayloadTooLarge(
                f"payload of {n} bytes exceeds the largest slot payload ({self._slot_max} bytes) "
                "and this link has no mmap tier (no control socket, or a segment without FEATURE_MMAP_LEASES)"
            )

    def _sent(self, tier: str, k: int, nbytes: int) -> None:
        """Count k messages carrying nbytes of payload sent on `tier` (tx lock held): this process's
        stats, and the ring's shared totals (FEATURE_RING_COUNTERS, read by shmhub top)."""
        st = self.stats
        if tier == "inline":
            st.sent_inline += k
            st.sent_bytes_inline += nbytes
        elif tier == "slot":
            st.sent_slot += k
            st.sent_bytes_slot += nbytes
        else:
            st.sent_mmap += k
            st.sent_bytes_mmap += nbytes
        self._tx.count_sent(k, nbytes)

    def _put_ref(self, write: Callable[[], bool], frame_size: int, deadline: Optional[float]) -> None:
        """Commit a slot- or mmap-reference frame with write(), waiting for ring room (tx lock held)."""
        if not write():
            tx = self._tx
            self.stats.ring_full_waits += 1
            self._wait(write, tx, True, deadline, lambda b: tx.spin_room(frame_size, b))

    def _send_locked(self, mv: memoryview, n: int, deadline: Optional[float]) -> None:
        """One payload by its tier (tx lock held); the caller notifies the consumer."""
        tx = self._tx
        if n <= self._inline_max:
            if not tx.write_inline(mv):
                self.stats.ring_full_waits += 1
                size = (L.FRAME_HEADER_SIZE + n + 3) & ~3
                self._wait(lambda: tx.write_inline(mv), tx, True, deadline, lambda b: tx.spin_room(size, b))
            self._sent("inline", 1, n)
        elif n <= self._slot_max:
            self._send_slot(mv, n, deadline)
        else:
            self._send_mmap(mv, n, deadline)

    def send_many(self, payloads: Union[Iterable[Buffer], Buffer], timeout: Optional[float] = None) -> int:
        """Send every payload of an iterable in order, or every row of a 2-D C-contiguous buffer
        (a numpy array of shape (count, row_bytes), say) as one message each. Small payloads are
        written in batches by the compiled core, with one wake-up check per batch. Returns how
        many were sent."""
        if not isinstance(payloads, (list, tuple)):
            try:
                rows = memoryview(cast("Buffer", payloads))  # TypeError: not a buffer, an iterable
            except TypeError:
                rows = None
            if rows is not None:
                return self._send_rows(rows, timeout)
        # a list: the core's batch writer takes exactly that
        items = payloads if isinstance(payloads, list) else list(cast("Iterable[Buffer]", payloads))
        deadline = _deadline(timeout)
        self._lock(self._tx_lock, deadline)
        try:
            self._check()
            tx, i, n = self._tx, 0, len(items)
            while i < n:
                k = tx.send_inline_many(items, i, self._inline_max)
                if k:
                    self._sent("inline", k, tx.batch_bytes)
                    i += k
                    self._notify(False, tx)
                    continue
                with memoryview(items[i]) as mv:
                    data = mv if mv.c_contiguous else memoryview(mv.tobytes())
                    self._check_size(data.nbytes)
                    self._send_locked(data, data.nbytes, deadline)  # a large one, or waits for room
                self._notify(False, tx)
                i += 1
            return n
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        finally:
            self._tx_lock.release()

    def _send_rows(self, rows: memoryview, timeout: Optional[float]) -> int:
        with rows:
            if rows.ndim != 2 or not rows.c_contiguous:
                raise TypeError("send_many takes an iterable of payloads or a 2-D C-contiguous buffer of rows")
            assert rows.shape is not None  # None only for a released view
            count, row_len = rows.shape[0], rows.shape[1] * rows.itemsize
            if count == 0:
                return 0
            with rows.cast("B") as flat:
                if row_len == 0 or row_len > self._inline_max:  # too large to batch inline: one by one
                    return self.send_many([flat[i * row_len : (i + 1) * row_len] for i in range(count)], timeout)
                return self._send_flat_rows(flat, count, row_len, timeout)

    def _send_flat_rows(self, flat: memoryview, count: int, row_len: int, timeout: Optional[float]) -> int:
        deadline = _deadline(timeout)
        self._lock(self._tx_lock, deadline)
        try:
            self._check()
            tx, i = self._tx, 0
            while i < count:
                k = tx.send_rows(flat, i, row_len)
                if k:
                    self._sent("inline", k, tx.batch_bytes)
                    i += k
                    self._notify(False, tx)
                    continue
                self._send_locked(flat[i * row_len : (i + 1) * row_len], row_len, deadline)  # waits for room
                self._notify(False, tx)
                i += 1
            return count
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        finally:
            self._tx_lock.release()

    def _payload_view(self, data: Buffer) -> Tuple[memoryview, int]:
        """(contiguous memoryview, length) of a payload, refused if no tier can carry it."""
        mv = memoryview(data)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        self._check_size(mv.nbytes)
        return mv, mv.nbytes

    def try_send(self, data: Buffer) -> bool:
        """send() without waiting: True if the message went out; False, with nothing sent and nothing
        held, if the ring is full, the slot pool exhausted, every mapping leased, or another thread is
        sending right now. Raises like send() if the link is gone or the payload too large."""
        mv, n = self._payload_view(data)
        if not self._tx_lock.acquire(blocking=False):
            return False
        try:
            return self._try_send_locked(mv, n) is None
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        finally:
            self._tx_lock.release()

    def _try_send_locked(self, mv: memoryview, n: int) -> Optional[str]:
        """One attempt (tx lock held): None if sent, else what was lacking: "ring", "slot" or "map".
        All or nothing: the ring's room is checked before a slot or mapping is taken, so a failed
        attempt holds nothing (this side is the ring's only producer while it holds the lock)."""
        self._check()
        tx = self._tx
        if n <= self._inline_max:
            if not tx.write_inline(mv):
                return "ring"
            self._sent("inline", 1, n)
        elif n <= self._slot_max:
            if not tx.can_grant(L.SLOT_REF_FRAME_SIZE):
                return "ring"
            ref = self._alloc_or_grow(n + L.SLOT_LEN_PREFIX)
            if ref is None:
                return "slot"
            c, e, s, gen = ref
            try:
                self._pool.write_payload(c, s, mv, e)
                sent = tx.write_slot_ref(c, e, s, gen)
            except BaseException:
                self._pool.free_if_current(c, e, s, gen, self._owner)
                raise
            if not sent:
                self._pool.free_if_current(c, e, s, gen, self._owner)
                return "ring"
            self._hold(c, e, s, gen)
            self._sent("slot", 1, n)
        else:
            if not tx.can_grant(L.MMAP_REF_FRAME_SIZE):
                return "ring"
            m = self._acquire_mapping(n)
            if m is None:
                return "map"
            self._count_lease(m, 1)
            try:
                m.region.write(L.MAP_HEADER_SIZE, mv)
                sent = tx.write_mmap_ref(m.map_id, m.generation, L.MAP_HEADER_SIZE, n)
            except BaseException:
                self._count_lease(m, -1)
                raise
            if not sent:
                self._count_lease(m, -1)
                return "ring"
            m.last_used = time.monotonic()
            self._sent("mmap", 1, n)
        self._notify(False, tx)
        return None

    def _send_slot(self, mv: memoryview, n: int, deadline: Optional[float]) -> None:
        seg, tx, need = self.segment, self._tx, n + L.SLOT_LEN_PREFIX
        try:
            if send_slot(tx, self._pool, mv, self._owner, False, self._shares) >= 0:  # the caller notifies
                self._sent("slot", 1, n)
                return
        except NeedExtent as err:
            seg._need(err)
        c, e, s, gen = self._take_slot(need, deadline)
        try:
            self._pool.write_payload(c, s, mv, e)
            self._put_ref(lambda: tx.write_slot_ref(c, e, s, gen), L.SLOT_REF_FRAME_SIZE, deadline)
        except BaseException:
            self._pool.free_if_current(c, e, s, gen, self._owner)  # never committed: still ours to free
            raise
        self._hold(c, e, s, gen)
        self._sent("slot", 1, n)

    def _take_slot(self, need: int, deadline: Optional[float]) -> SlotRefParts:
        """A slot for `need` bytes, waiting while the fitting classes are exhausted or hold this
        link's share. At its share the link waits for its own receiver to free one (it rings us:
        trap 27); on an exhausted pool, for anyone to free one (the class futex,
        FEATURE_POOL_WAITERS). Each wait sleeps until its event, never on a timer."""
        pool, shares, counted = self._pool, self._shares, False
        while True:
            self._check()
            try:
                ref = self._alloc_or_grow(need)
                if ref is not None:
                    return ref
                if not counted:  # the first attempt may succeed: the fast path failed on ring room
                    self.stats.slot_exhaustion_waits += 1
                    counted = True
                if shares is not None and shares.over:  # our receiver holds our share: wait for it
                    r = self._wait(lambda: self._alloc_or_grow(need) or (None if shares.over else _EXHAUSTED), self._tx, True, deadline, None)
                    if r is not _EXHAUSTED:
                        return r  # type: ignore[return-value]  # a ref: the attempt returns a ref or _EXHAUSTED
                    continue  # no longer at our share, but the pool is exhausted: wait for anyone's free
                if not pool.waiters:  # a v7 segment: no futex words to sleep on
                    return self._wait(lambda: self._alloc_or_grow(need), self._tx, True, deadline, None, SLOT_WAIT_SLICE)
                rem = _remaining(deadline)
                if rem is not None and rem <= 0:
                    raise ShmTimeout("timed out waiting for a free slot")
                if self._is_guest and self.doorbell is not None:
                    rem = HOST_DEATH_CHECK if rem is None else min(rem, HOST_DEATH_CHECK)
                ref = pool.wait_alloc(need, self._owner, -1.0 if rem is None else rem)
            except NeedExtent as err:  # the free slot is in an extent new to us: map it, try again
                self.segment._need(err)
                continue
            if ref is not None:
                return ref
            if self._is_guest and self.doorbell is not None and self.doorbell.hung_up():
                self._mark_dead("doorbell hang-up")

    def _hold(self, c: int, e: int, s: int, gen: int) -> None:
        """A slot ref was committed on this link: it counts against the link's share until freed."""
        if self._shares is not None:
            self._shares.add(c, e, s, gen)

    def _alloc_or_grow(self, need: int) -> Optional[SlotRefParts]:
        """A slot within this link's shares. Exhausted pool: the host grows a growable class
        itself; a guest asks the host to."""
        seg, shares = self.segment, self._shares
        if shares is None:
            ref = seg.alloc(need, self._owner)
        else:
            while True:
                try:
                    ref = shares.alloc(need, self._owner)
                    break
                except NeedExtent as err:  # a free slot in an extent new to us: map it, try again
                    seg._need(err)
        if ref is None and not (self._shares is not None and self._shares.over):
            if self.side == HOST:
                if seg.grow_for(need):
                    ref = seg.alloc(need, self._owner)
            else:
                seg.request_growth(need)
        return ref

    def _acquire_mapping(self, n: int) -> Optional[Mapping]:
        assert self._maps_tx is not None  # _check_size() refuses what needs the mmap tier on a link without one
        try:
            return self._maps_tx.acquire(n)
        except PeerDead as e:  # the control socket's peer is gone: so is the peer, not a corruption
            self._mark_dead(str(e))
            raise self._gone_error() from None

    def _count_lease(self, m: Mapping, delta: int) -> None:
        """Take (+1) or give back (-1) a sender's lease on m, keeping the inspect counters current."""
        region, (maps_off, kib_off, leases_off) = self.segment.region, self._tx_counters
        if delta > 0:
            assert self._maps_tx is not None  # m came from it
            maps = self._maps_tx.maps
            region.store_u32(maps_off, len(maps))
            region.store_u32(kib_off, min(0xFFFFFFFF, sum(x.size for x in maps) >> 10))
            region.fetch_add_u32(leases_off, 1)
            m.add_lease()
        else:
            m.drop_lease()
            region.fetch_add_u32(leases_off, 0xFFFFFFFF)

    def _send_mmap(self, mv: memoryview, n: int, deadline: Optional[float]) -> None:
        tx = self._tx
        m = self._acquire_mapping(n)
        if m is None:  # every mapping is leased: wait for the receiver to release one
            self.stats.mapping_waits += 1
            m = self._wait(lambda: self._acquire_mapping(n), tx, True, deadline, None)
        self._count_lease(m, 1)  # before the ref is visible: the receiver may release at once
        try:
            m.region.write(L.MAP_HEADER_SIZE, mv)  # payload, then (Release) the ref: format-v7 2.9 order
            self._put_ref(lambda: tx.write_mmap_ref(m.map_id, m.generation, L.MAP_HEADER_SIZE, n), L.MMAP_REF_FRAME_SIZE, deadline)
        except BaseException:
            self._count_lease(m, -1)
            raise
        m.last_used = time.monotonic()
        self._sent("mmap", 1, n)

    # -- zero-copy send ---------------------------------------------------------------------

    def _reserve_slow(self, nbytes: int, timeout: Optional[float]) -> Message:
        """reserve() when the core could not take a slot at once: waits, growth, the mmap tier, errors."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        self._check_size(max(nbytes, self._inline_max + 1))
        deadline = _deadline(timeout)
        self._check()
        if nbytes <= self._slot_max:
            return self._reserved_slot(*self._take_slot(nbytes + L.SLOT_LEN_PREFIX, deadline), nbytes)
        self._lock(self._tx_lock, deadline)  # the mapping list is the sender's
        try:
            m = self._acquire_mapping(nbytes)
            if m is None:
                self.stats.mapping_waits += 1
                m = self._wait(lambda: self._acquire_mapping(nbytes), self._tx, True, deadline, None)
            m.add_lease()  # held by the reservation; handed to the receiver by send_reserved
        finally:
            self._tx_lock.release()
        buf = Message(m.region, L.MAP_HEADER_SIZE, nbytes, "mmap", m.drop_lease, True)
        buf.token = (self, m)
        return buf

    def _send_reserved_slow(self, buf: Message, n: int, timeout: Optional[float]) -> None:
        """send_reserved() (buf and n checked by the core) when the ring is full, for the mmap tier
        and on errors."""
        token = buf.token
        assert token is not None  # checked by LinkCore.send_reserved
        deadline = _deadline(timeout)
        self._lock(self._tx_lock, deadline)
        try:
            self._check()
            tx, ref = self._tx, token[1]
            if buf.tier == "slot":
                c, e, s, gen = ref
                self._pool.set_payload_len(c, s, n, e)
                self._put_ref(lambda: tx.write_slot_ref(c, e, s, gen), L.SLOT_REF_FRAME_SIZE, deadline)
                self._hold(c, e, s, gen)
                self._sent("slot", 1, n)
            else:
                m = ref
                region, leases_off = self.segment.region, self._tx_counters[2]
                region.fetch_add_u32(leases_off, 1)  # the inspect counter; the mapping's lease came with reserve()
                try:
                    self._put_ref(lambda: tx.write_mmap_ref(m.map_id, m.generation, L.MAP_HEADER_SIZE, n), L.MMAP_REF_FRAME_SIZE, deadline)
                except BaseException:
                    region.fetch_add_u32(leases_off, 0xFFFFFFFF)
                    raise
                m.last_used = time.monotonic()
                self._sent("mmap", 1, n)
            buf.detach()  # committed: the lease / slot now travels with the ref
            self._notify(False, tx)
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        finally:
            self._tx_lock.release()

    def empty(self, shape: Union[int, Sequence[int]], dtype: npt.DTypeLike = "float64") -> npt.NDArray[Any]:
        """A numpy array in shared memory (data 64-byte aligned), to fill and send_array() without a copy."""
        from . import codec

        return codec.empty(self, shape, dtype)

    def send_array(self, a: npt.ArrayLike, timeout: Optional[float] = None) -> None:
        """Send a numpy array: zero-copy if it came from empty() on this link, else one memcpy."""
        from . import codec

        codec.send_array(self, a, timeout)

    def recv_array(self, timeout: Optional[float] = None) -> npt.NDArray[Any]:
        """Receive an array sent with send_array: a read-only ndarray viewing shared memory (its
        memory goes back when the array is garbage collected)."""
        from . import codec

        return codec.recv_array(self, timeout)

    @property
    def mappings(self) -> Dict[str, int]:
        """mmap-tier bookkeeping: mappings we send through and mappings we received."""
        tx, rx = self._maps_tx, self._maps_rx
        if tx is None or rx is None:  # both or neither
            return {}
        return {
            "tx_mappings": len(tx.maps),
            "tx_created": tx.created,
            "tx_reused": tx.reused,
            "tx_retired": tx.retired,
            "tx_leases": sum(m.leases for m in tx.maps if not m.region.closed),
            "rx_mappings": len(rx.maps),
        }

    # -- receive ----------------------------------------------------------------------------

    def _drop_lease(self, m: Mapping) -> None:
        try:
            m.drop_lease()
            if not self._recovered:
                self.segment.region.fetch_add_u32(self._rx_leases, 0xFFFFFFFF)
        except ValueError:
            return  # mapping or segment already closed (link torn down)
        if not self._closed and not self._dead and self.doorbell is not None:
            if not self._elide or self._rx.claim_peer_waiting(True):
                self.doorbell.ring()

    def _slot_freed(self) -> None:
        """A received slot was freed and the producer announced it waits for one (the core claimed
        its flag; without elision it is called for every slot): ring it (trap 27)."""
        if self._ok and self.doorbell is not None:
            self.doorbell.ring()

    def _free_slot(self, c: int, e: int, s: int, gen: int) -> None:
        if self.segment.closed:
            return  # this process closed the segment: nothing to give back (host recovery reclaims)
        self._pool.free_if_current(c, e, s, gen, self._owner)
        if not self._closed and not self._dead and self.doorbell is not None:
            # The producer may sleep waiting for a slot (trap 27).
            if not self._elide or self._rx.claim_peer_waiting(True):
                self.doorbell.ring()

    def _take_frame(self, frame: FrameTuple) -> Message:
        """Turn a ring frame into a Message and release its ring bytes (rx lock held)."""
        rx = self._rx
        kind = frame[0]
        if kind == L.KIND_INLINE:
            payload = cast(bytes, frame[2])  # an InlineTuple (kind, total_len, payload)
            rx.release(frame[1])
            self.stats.recv_inline += 1
            self.stats.recv_bytes_inline += len(payload)
            return Message(payload, 0, len(payload), "inline")
        if kind == L.KIND_SLOT_REF:
            _, total, c, e, s, gen = cast("SlotRefTuple", frame)
            try:
                # DECISIONS 9: become the owner before exposing the data (and before releasing the ring bytes).
                n = self.segment.take(c, e, s, gen, self._owner)
                region, off = self._pool.payload_span(c, s, e)
            except (SlotError, SegmentCorrupted) as err:
                raise self._corrupted(err) from None
            try:
                rx.release(total)
            except LinkCorrupted:
                self._free_slot(c, e, s, gen)  # ours since the take: not left allocated for good
                raise
            self.stats.recv_slot += 1
            self.stats.recv_bytes_slot += n
            return Message(region, off, n, "slot", lambda: self._free_slot(c, e, s, gen))
        _, total, map_id, gen, off, n = cast("MmapRefTuple", frame)
        if kind == L.KIND_MMAP_RETURN:
            return self._take_returned(total, map_id, gen, off, n)
        if self._maps_rx is None:
            raise self._corrupted(LinkCorrupted("mmap-ref frame received, but this link has no mmap tier"))
        try:
            m = self._maps_rx.resolve(map_id, gen, off, n)
        except LinkCorrupted as err:
            raise self._corrupted(err) from None
        rx.release(total)
        self.stats.recv_mmap += 1
        self.stats.recv_bytes_mmap += n
        return Message(m.region, off, n, "mmap", lambda: self._drop_lease(m))

    def _take_returned(self, total: int, map_id: int, gen: int, off: int, n: int) -> Message:
        """A return ref: the peer lends back a payload lying in one of our own mappings."""
        if self._maps_tx is None or not self.segment.features & L.FEATURE_MMAP_RETURN:
            raise self._corrupted(LinkCorrupted("mmap return ref received on a link without FEATURE_MMAP_RETURN"))
        try:
            m = self._maps_tx.returned(map_id, gen, off, n)
        except LinkCorrupted as err:
            raise self._corrupted(err) from None
        self._rx.release(total)
        self.stats.recv_mmap += 1
        self.stats.recv_bytes_mmap += n
        return Message(m.region, off, n, "mmap", lambda: self._return_lease(m))

    def _return_lease(self, m: Mapping) -> None:
        """A returned payload was released: the lease the peer took for it goes, and a thread of ours
        waiting for a free mapping looks again."""
        try:
            self._count_lease(m, -1)
        except ValueError:
            return  # mapping or segment already closed (link torn down)
        self._waiter.wake_all()

    def lend(self, data: Buffer, timeout: Optional[float] = None) -> bool:
        """Send `data` by reference, without a copy, if it lies in a payload of this link's mmap tier
        still held here: one received from the peer (it gets a view of its own mapping back:
        FEATURE_MMAP_RETURN) or one of ours that the peer lent back. Each such send takes a lease of
        its own, so the memory stays put until both ends have released it. False: it does not lie
        in one (nothing was sent; send() copies it)."""
        span = self._span(data)
        if span is None:
            return False
        addr, n = span
        deadline = _deadline(timeout)
        self._lock(self._tx_lock, deadline)  # the sender's mappings change only under it
        try:
            self._check()
            found = self._lent_from(addr, n)
            if found is None:
                return False
            m, flags = found
            off = addr - m.region.address
            # The lease, and the inspect counter of the direction the mapping belongs to (a
            # return ref's: the peer's, which it decrements when it releases the payload).
            counter, region = (self._rx_leases if flags else self._tx_counters[2]), self.segment.region
            region.fetch_add_u32(counter, 1)
            m.add_lease()
            tx = self._tx
            try:
                self._put_ref(lambda: tx.write_mmap_ref(m.map_id, m.generation, off, n, flags), L.MMAP_REF_FRAME_SIZE, deadline)
            except BaseException:
                m.drop_lease()
                region.fetch_add_u32(counter, 0xFFFFFFFF)
                raise
            self._sent("mmap", 1, n)
            self._notify(False, tx)
            return True
        except LinkCorrupted as e:
            raise self._corrupted(e) from None
        finally:
            self._tx_lock.release()

    def lendable(self, data: Buffer) -> bool:
        """Whether lend() would send `data` by reference now."""
        span = self._span(data)
        return span is not None and self._lent_from(*span) is not None

    def _span(self, data: Buffer) -> Optional[Tuple[int, int]]:
        """(address, length) of data if it could lie in a payload of the mmap tier."""
        if self._maps_tx is None or self._maps_rx is None or not self.segment.features & L.FEATURE_MMAP_RETURN:
            return None
        with memoryview(data) as mv:
            if not mv.c_contiguous or mv.nbytes <= self._slot_max:
                return None
            return buffer_address(mv), mv.nbytes

    def _lent_from(self, addr: int, n: int) -> Optional[Tuple[Mapping, int]]:
        """The mapping [addr, addr + n) lies in and the MR_FLAGS of a ref to it, if it holds a lease
        (without one it may be reused meanwhile)."""
        assert self._maps_tx is not None and self._maps_rx is not None  # checked by _span
        m = holding(tuple(self._maps_rx.maps.values()), addr, n)
        flags = L.MR_RETURN
        if m is None:
            m, flags = holding(tuple(self._maps_tx.maps), addr, n), 0
        if m is None or m.leases == 0:
            return None
        return m, flags

    def _poll_slow(self, as_bytes: bool = False) -> Union[None, Message, bytes]:
        """LinkCore._poll_locked's fallback (rx lock held): backlog, closed links, mmap refs, errors."""
        if self._backlog:
            msg = self._backlog.popleft()
            return _as_bytes(msg) if as_bytes else msg
        if self._closed or self._corrupt or self._recovered:
            self._check()
        rx = self._rx
        try:
            try:
                r = recv_next(rx, self._pool, self._owner, self._elide, self._on_slot_free)
            except NeedExtent as err:  # a slot in an extent new to us: map it, read the frame again
                self.segment._need(err)
                r = recv_next(rx, self._pool, self._owner, self._elide, self._on_slot_free)
        except (LinkCorrupted, SlotError, SegmentCorrupted) as e:
            raise self._corrupted(e) from None
        if r is None:
            return None
        tr = type(r)
        if tr is bytes or tr is Message:
            st = self.stats
            if tr is bytes:
                st.recv_inline += 1
                st.recv_bytes_inline += len(r)
            else:
                st.recv_slot += 1
                st.recv_bytes_slot += len(r)
            if rx.producer_waiting or not self._elide:  # a producer may wait for space (trap 27)
                self._ring()
            else:
                st.doorbells_elided += 1
            if as_bytes:
                return cast(bytes, r) if tr is bytes else _as_bytes(cast(Message, r))
            return Message(cast(bytes, r), 0, len(r), "inline") if tr is bytes else cast(Message, r)
        msg = self._take_frame(cast("FrameTuple", r))
        self._notify(True, rx)
        return _as_bytes(msg) if as_bytes else msg

    def _try_recv(self, as_bytes: bool) -> Union[None, Message, bytes]:
        with self._rx_lock:
            msg = self._poll_locked(as_bytes)
            if msg is None and self._watched and self.alive:
                msg = self._rearm_locked(as_bytes)
            if msg is None and (not self._ok or (self.side == GUEST and self.segment.host_goodbye)):
                self._check()
            return msg

    @overload
    def _rearm_locked(self, as_bytes: Literal[False] = False) -> Optional[Message]: ...
    @overload
    def _rearm_locked(self, as_bytes: bool) -> Union[None, Message, bytes]: ...

    def _rearm_locked(self, as_bytes: bool = False) -> Union[None, Message, bytes]:
        """fileno() users with nothing left to receive: drain the doorbell so the fd stays quiet,
        announce we wait (so the peer rings), and re-check (rx lock held). Drain before announcing:
        a peer's late notify of a frame already read may claim the new announcement and ring; a
        drain after the announcement would eat that byte, and the peer, finding the flag claimed,
        would not ring for its next frame (a lost wakeup, seen with 64 guests on 2 cores)."""
        if self._waiter.try_begin():  # one poller per doorbell (trap 32); else that poller drains
            assert self.doorbell is not None  # _watched: fileno() found a doorbell
            try:
                self.doorbell.drain()
            except PeerDead as e:
                self._mark_dead(str(e))
            finally:
                self._waiter.end()
        self._rx.set_waiting(False, 1)
        return self._poll_locked(as_bytes)

    async def arecv(self, timeout: Optional[float] = None) -> Message:
        """recv() for asyncio: waits on the doorbell through the running loop (see shmhub.aio)."""
        from .aio import arecv

        return await arecv(self, timeout)

    async def asend(self, data: Buffer, timeout: Optional[float] = None) -> None:
        """send() for asyncio: waits for ring room, a slot or a mapping without blocking the loop."""
        from .aio import asend

        await asend(self, data, timeout)

    def __aiter__(self) -> LinkIterator:
        """`async for msg in link`: messages until the peer is gone."""
        from .aio import LinkIterator

        return LinkIterator(self)

    def _recv(self, timeout: Optional[float], as_bytes: bool, spin: bool = True) -> Union[Message, bytes]:
        """recv() when the core's fast path found nothing (spin False: it spun already)."""
        lock = self._rx_lock
        deadline = None
        if not lock.acquire(False):
            deadline = _deadline(timeout)
            self._lock(lock, deadline)
        try:
            msg = self._poll_locked(as_bytes)
            if msg is not None:
                return msg
            if deadline is None:
                deadline = _deadline(timeout)
            self.stats.recv_waits += 1
            # mypy joins Message and bytes into object when it solves _wait's type variable (no
            # typing.cast: a call on every wake-up)
            return self._wait(lambda: self._poll_locked(as_bytes), self._rx, False, deadline, self._rx.spin_readable if spin else None)  # type: ignore[return-value]
        finally:
            lock.release()

    def recv_many(self, max_count: int, timeout: Optional[float] = None) -> List[Union[bytes, Message]]:
        """Wait (up to timeout) for at least one message, then return up to max_count without
        waiting more. Inline payloads come as bytes, slot and mmap payloads as Messages (both
        expose the buffer protocol and len()). Messages hold their shared memory until released:
        drop a batch before asking for the next, or the sender may run out of slots."""
        if max_count < 1:
            raise ValueError("max_count must be at least 1")
        deadline = _deadline(timeout)
        self._lock(self._rx_lock, deadline)
        try:
            out: List[Union[bytes, Message]] = []
            rx = self._rx
            while len(out) < max_count:
                if not self._backlog and self._ok:
                    try:
                        batch = rx.recv_inline_many(max_count - len(out), self._elide)
                    except LinkCorrupted as e:
                        raise self._corrupted(e) from None
                    if batch:
                        self.stats.recv_inline += len(batch)
                        self.stats.recv_bytes_inline += rx.batch_bytes
                        out.extend(batch)
                        if rx.producer_waiting or not self._elide:
                            self._ring()
                        continue
                msg = self._poll_locked() if out else self._wait(self._poll_locked, rx, False, deadline, rx.spin_readable)
                if msg is None:
                    break
                out.append(msg)
            return out
        finally:
            self._rx_lock.release()

    def __iter__(self) -> Iterator[Message]:
        """Messages until the peer is gone (PeerDead on the host, HostGone on a guest) or the link closed."""
        while True:
            try:
                yield self.recv()
            except (PeerDead, HostGone, LinkClosed):
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
        self._ok = False
        self._waiter.wake_all()
        if self._pool.waiters and not self.segment.closed:
            self._pool.wake_all()  # a thread of ours may sleep on a slot futex
        if self.side == HOST:
            # rx before tx, the order Host._recover takes them in (else the two deadlock)
            with self._rx_lock, self._tx_lock:  # the sleepers woke above and let go of them
                self._waiter.close()
        if self.side == GUEST:
            with self._rx_lock, self._tx_lock:
                try:
                    self.segment.peers.leave(self.peer_id, self._epoch)
                except (ValueError, OSError):
                    pass
                self._release_backlog()
                self._close_maps()
                self._waiter.close()
                if self.doorbell is not None:
                    self.doorbell.close()
                if self._owns_segment:
                    self.segment.close()

    def _close_maps(self) -> None:
        """Drop every mapping of this link (views users still hold stay valid until released)."""
        for maps in (self._maps_tx, self._maps_rx):
            if maps is not None:
                maps.close()
        if self._control is not None:
            self._control.close()

    def _release_backlog(self) -> None:
        while self._backlog:
            try:
                self._backlog.popleft().release()
            except BufferError:
                pass

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # A guest's unclosed link keeps its peer entry until the process exits, and the host then
        # reports a death, not a goodbye: say so, as an unclosed file does (ResourceWarning).
        # Nothing is closed from here: the collector may run in a thread holding this link's locks.
        # A host's links are the Host's to close.
        if not getattr(self, "_closed", True) and self.side == GUEST:
            _warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("dead" if self._dead else "corrupted" if self._corrupt else "open")
        return f"<Link {self.side} peer={self.peer_id} {state}>"


__all__ = ["Link", "LinkStats", "Message", "HOST", "GUEST", "DEFAULT_SPIN_NS"]
