"""asyncio support: Link.arecv / Link.asend / `async for msg in link`, Host.arecv_any.

Waiting goes through the running loop, pyzmq style: a waiter announces itself on the ring's waiting
flag (so the peer rings instead of eliding the doorbell), re-checks, puts a reader on the doorbell
fd, and awaits a future that the reader (or a timeout, or close / peer death) resolves. Nothing in
here blocks the loop or spins on it:

* One poller per doorbell per process (DECISIONS 12, trap 32): an asyncio waiter takes the doorbell
  with the link's _Waiter.try_begin(); its reader drains the doorbell and calls wake_all(), which
  wakes the threads sleeping on the waiter's condition and every other asyncio waiter of the link
  (they re-check their predicates). If a thread already polls the doorbell, asyncio does not compete
  for the fd: it re-checks in bounded slices (ASYNC_SLICE) until that thread is done.
* The reader watches a dup() of the doorbell fd, so a doorbell closed by another thread (host
  recovery, Link.close) can never leave the loop watching a reused fd number.
* Waiting flags are counted per process (_Waiter.announce / withdraw), so a task and a thread can
  wait on the same ring side: the flag drops only when the last of them stops waiting.
* Threading locks are taken without blocking and never held across an await, so close() and host
  recovery never wait for a suspended task; a busy lock means "another thread is at it": re-check
  in bounded slices.
* Slot exhaustion can be relieved by any process freeing a slot, which no doorbell reports: a helper
  thread sleeps on the pool's futex (FEATURE_POOL_WAITERS) without allocating and wakes the task,
  which then tries again all or nothing (on a v7 segment it re-checks every ASYNC_SLICE, DECISIONS
  10, trap 8). A link at its slot share, ring room and mapping leases wait on the doorbell.
* A call that finds its message (or room) at once does not suspend, so a busy loop over arecv /
  asend would never let other tasks run: every call first yields to the loop if this thread has not
  suspended in shmhub for YIELD_AFTER seconds (before anything is taken: a cancellation there loses
  nothing).
* A send is one all-or-nothing attempt (Link._try_send_locked): a cancelled or timed-out asend()
  has sent nothing and holds no slot, lease or flag.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Set, Tuple

from ._native import Message
from .errors import HostGone, LinkClosed, PeerDead, ShmTimeout
from .layout import SLOT_LEN_PREFIX
from .link import POLL_SLICE, Link, _deadline, _remaining

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

    from ._native import Ring
    from .host import GuestHandle, Host

# Re-check period when the doorbell cannot tell us (another thread polls it, its lock is busy,
# slot / mapping exhaustion that other processes may relieve).
ASYNC_SLICE = 0.001

# Longest stretch a task may run through shmhub calls that complete at once before it yields.
YIELD_AFTER = 0.001

_WAIT = object()  # not ready; the doorbell (or a wake_all) will tell
_SLICE = object()  # not ready; re-check within ASYNC_SLICE whatever happens


class _Futex:
    """Not ready: the slot pool is exhausted; a free anywhere (the pool's futex) will tell."""

    __slots__ = ("need",)

    def __init__(self, need: int) -> None:
        self.need = need


class _LastSuspend(threading.local):
    t = 0.0  # monotonic time this thread's loop last suspended a task in shmhub


_last = _LastSuspend()


async def _checkpoint() -> None:
    """Yield to the loop unless this thread suspended in shmhub within YIELD_AFTER (fairness)."""
    if time.monotonic() - _last.t >= YIELD_AFTER:
        await asyncio.sleep(0)
        _last.t = time.monotonic()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Sleep:
    """One sleep of one task on the doorbells of one or more links."""

    __slots__ = ("loop", "tid", "fut", "cap", "waker", "watched", "owned", "pool", "helper")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.tid = threading.get_ident()  # the loop's thread (a loop lookup is a getpid() in 3.11)
        self.fut = loop.create_future()
        self.cap: Optional[float] = None
        self.waker = self._wake
        self.watched: List[Any] = []  # _Waiters whose wake_all() wakes us
        self.owned: List[Tuple[Any, int]] = []  # (_Waiter, dup'd doorbell fd) we poll
        self.pool: Any = None
        self.helper: Optional[threading.Thread] = None  # sleeps on the pool's futex for us

    def limit(self, seconds: float) -> None:
        self.cap = seconds if self.cap is None else min(self.cap, seconds)

    def _wake(self) -> None:
        """Resolve the future from any thread (Future methods are not thread-safe)."""
        try:
            if threading.get_ident() == self.tid:
                _resolve(self.fut)
            else:
                self.loop.call_soon_threadsafe(_resolve, self.fut)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits any more

    def watch(self, link: Link) -> None:
        """Be woken by the link's doorbell: poll it ourselves if nobody does; rely on the fan-out of
        another asyncio poller; or, if a thread polls it, re-check in bounded slices (trap 32)."""
        waiter = link._waiter
        waiter.wakers.add(self.waker)
        self.watched.append(waiter)
        bell = link.doorbell
        if bell is None:  # walk-in guest: nothing to wait on but time
            self.limit(POLL_SLICE)
            return
        if not waiter.try_begin():
            if not waiter.async_poll:
                self.limit(ASYNC_SLICE)
            return
        try:
            fd = os.dup(bell.sock.fileno())  # fileno() is -1 once closed: EBADF
        except OSError:
            waiter.end()
            link._mark_dead("doorbell closed")
            return
        self.owned.append((waiter, fd))
        waiter.async_poll = True
        self.loop.add_reader(fd, self._on_ring, link, fd)

    def futex(self, link: Link, need: int, timeout: Optional[float]) -> None:
        """Be woken when a slot of a class fitting `need` bytes is freed by any process: a daemon
        thread sleeps on the pool's futex words (GIL released) and resolves our future."""
        pool = link._pool
        if not pool.waiters:
            self.limit(ASYNC_SLICE)  # a v7 segment: nothing to sleep on
            return
        self.pool = pool

        def run() -> None:
            try:
                pool.wait_alloc(need, link._owner, -1.0 if timeout is None else timeout, False)
            except (ValueError, OSError):
                pass  # the segment was closed: the task re-checks and raises
            self._wake()

        self.helper = threading.Thread(target=run, name="shmhub-aio-slot-wait", daemon=True)
        self.helper.start()

    def _on_ring(self, link: Link, fd: int) -> None:
        assert link.doorbell is not None  # watch() adds this reader only for a link with a doorbell
        try:
            link.doorbell.drain()
        except (PeerDead, OSError) as e:
            self.loop.remove_reader(fd)  # EOF stays readable: stop listening
            link._mark_dead(str(e) or type(e).__name__)
        link._waiter.wake_all()  # threads on the condition and every asyncio waiter re-check
        if link._waiter.on_drain is not None:
            link._waiter.on_drain()  # Host.recv_any may have wanted that byte

    async def sleep(self, timeout: Optional[float]) -> None:
        if self.cap is not None:
            timeout = self.cap if timeout is None else min(timeout, self.cap)
        if self.fut.done():
            return
        timer = None if timeout is None else self.loop.call_later(max(0.0, timeout), _resolve, self.fut)
        try:
            await self.fut
        finally:
            _last.t = time.monotonic()
            if timer is not None:
                timer.cancel()

    def close(self) -> None:
        """Remove readers, hand the doorbells back, let other asyncio waiters take over the poll."""
        for waiter in self.watched:
            waiter.wakers.discard(self.waker)
        for waiter, fd in self.owned:
            self.loop.remove_reader(fd)
            os.close(fd)
            waiter.async_poll = False
            waiter.end()  # threads waiting on the condition re-check; one becomes the poller
            for wake in tuple(waiter.wakers):
                wake()
        self.owned.clear()
        self.watched.clear()
        if self.helper is not None and self.helper.is_alive():
            # Woken by something else (cancelled, timed out, a doorbell): release the helper. This
            # wakes every slot waiter once; each re-checks and sleeps again.
            try:
                self.pool.wake_all()
            except (ValueError, OSError):
                pass
        self.helper = None


async def _check(link: Link, attempt: Callable[[], Any], producer: bool, deadline: Optional[float]) -> Any:
    """link._check() inside a wait, with Link._check_waiting's last look for a receiver: frames the
    peer committed before it died are delivered before PeerDead / HostGone. Host recovery moves them
    to the backlog holding the rx lock, so a busy lock (_SLICE) means: look again shortly."""
    try:
        link._check()
        return None
    except (PeerDead, HostGone) as e:
        if producer:
            raise
        gone = e
    while True:
        r = attempt()
        if r is _WAIT or type(r) is _Futex:
            raise gone
        if r is not _SLICE:
            return r
        rem = _remaining(deadline)
        if rem is not None and rem <= 0:
            raise gone
        await asyncio.sleep(ASYNC_SLICE if rem is None else min(rem, ASYNC_SLICE))


async def _until(link: Link, attempt: Callable[[], Any], ring: Ring, producer: bool, deadline: Optional[float]) -> Any:
    """Run attempt() until it returns something other than _WAIT / _SLICE, sleeping on the doorbell
    in between: announce on the ring's waiting flag, arm the reader, re-check, sleep."""
    loop = asyncio.get_running_loop()
    await _checkpoint()
    while True:
        r = attempt()
        if r is not _WAIT and r is not _SLICE and type(r) is not _Futex:
            return r
        r = await _check(link, attempt, producer, deadline)
        if r is not None:
            return r
        rem = _remaining(deadline)
        if rem is not None and rem <= 0:
            raise ShmTimeout("timed out")
        sl = _Sleep(loop)
        if r is _SLICE:
            sl.limit(ASYNC_SLICE)
        announced = False
        try:
            link._waiter.announce(ring, producer)
            announced = True
            sl.watch(link)
            r = attempt()  # re-check after announcing (no lost wakeup)
            if r is not _WAIT and r is not _SLICE and type(r) is not _Futex:
                return r
            if r is _SLICE:
                sl.limit(ASYNC_SLICE)
            elif type(r) is _Futex:
                sl.futex(link, r.need, rem)
            r = await _check(link, attempt, producer, deadline)
            if r is not None:
                return r
            await sl.sleep(rem)
        except ValueError:
            link._check()  # the segment was closed under us: LinkClosed / PeerDead
            raise
        finally:
            sl.close()
            if announced:
                link._waiter.withdraw(ring, producer)


async def arecv(link: Link, timeout: Optional[float] = None) -> Message:
    """The next message of the link; waits without blocking the loop. Messages already in the ring
    are delivered before PeerDead / HostGone; ShmTimeout after timeout seconds."""
    deadline = _deadline(timeout)
    lock = link._rx_lock
    waited = False

    def attempt() -> object:
        nonlocal waited
        if not lock.acquire(blocking=False):
            return _SLICE  # another thread receives from this link right now
        try:
            msg = link._poll_locked()
        finally:
            lock.release()
        if msg is not None:
            return msg
        if not waited:
            waited = True
            link.stats.recv_waits += 1
        return _WAIT

    msg: Message = await _until(link, attempt, link._rx, False, deadline)
    return msg


async def asend(link: Link, data: Buffer, timeout: Optional[float] = None) -> None:
    """Send a bytes-like object; waits for ring room, a free slot or a free mapping without blocking
    the loop. On ShmTimeout or cancellation nothing was sent and nothing is held."""
    mv, n = link._payload_view(data)
    deadline = _deadline(timeout)
    lock = link._tx_lock
    counted: Set[str] = set()

    def attempt() -> object:
        if not lock.acquire(blocking=False):
            return _SLICE  # another thread sends on this link right now
        try:
            why = link._try_send_locked(mv, n)
        finally:
            lock.release()
        if why is None:
            return True
        if why not in counted:
            counted.add(why)
            st = link.stats
            if why == "ring":
                st.ring_full_waits += 1
            elif why == "slot":
                st.slot_exhaustion_waits += 1
            else:
                st.mapping_waits += 1
        # Ring room, our share of the pool and mapping leases are given back by our peer (it rings);
        # a slot of an exhausted pool may be freed by anyone (the pool's futex).
        if why == "slot" and not (link._shares is not None and link._shares.over):
            return _Futex(n + SLOT_LEN_PREFIX)
        return _WAIT

    await _until(link, attempt, link._tx, True, deadline)


class LinkIterator:
    """`async for msg in link`: messages until the peer is gone (PeerDead / HostGone) or the link closed."""

    __slots__ = ("link",)

    def __init__(self, link: Link) -> None:
        self.link = link

    def __aiter__(self) -> "LinkIterator":
        return self

    async def __anext__(self) -> Message:
        try:
            return await arecv(self.link)
        except (PeerDead, HostGone, LinkClosed):
            raise StopAsyncIteration from None


async def arecv_any(host: "Host", timeout: Optional[float] = None) -> Tuple["GuestHandle", Message]:
    """The next message from any guest (round-robin): the same readiness set as Host.recv_any, its
    epoll fd watched by the running loop."""
    deadline = _deadline(timeout)
    loop = asyncio.get_running_loop()
    queue = host._any
    host._activate_any()
    await _checkpoint()
    while True:
        host._check_open()
        got = queue.next()
        if got is not None:
            return got
        rem = _remaining(deadline)
        if rem is not None and rem <= 0:
            raise ShmTimeout("no message from any guest")
        fut = loop.create_future()
        fd = queue.ep.fileno()
        loop.add_reader(fd, _resolve, fut)
        timer = None if rem is None else loop.call_later(rem, _resolve, fut)
        try:
            await fut
        finally:
            _last.t = time.monotonic()
            loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()


__all__ = ["arecv", "asend", "arecv_any", "LinkIterator", "ASYNC_SLICE"]
