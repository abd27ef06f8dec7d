"""The front's workers: spawn them as guests of one Host, send each request to the least-loaded
one (at most max_in_flight each), queue a bounded number of requests when all are busy, replace
a worker that dies or is retired, and roll to a new generation on reload.

Runs in the front's event loop; the Host's monitor thread only posts "a guest died" into it.
Nothing here polls: waiters are futures resolved when a worker has room."""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Deque, Dict, List, Optional, Sequence

from .. import rpc
from ..errors import HttpError
from ..host import GuestHandle, Host, HostEvent
from ..layout import SegmentConfig

__all__ = ["QueueFull", "Worker", "WorkerPool", "worker_command"]

log = logging.getLogger("shmhub.http")

START_TIMEOUT = 30.0  # seconds for a new worker to import the app and answer its first call


class QueueFull(HttpError):
    """Every worker is at max_in_flight and the front's queue is full (the gateway answers 503)."""


def worker_command(app: str, interface: str, max_in_flight: int, switch_interval: Optional[float] = None) -> List[str]:
    """The argv that starts one worker guest running `app`."""
    argv = [sys.executable, "-m", "shmhub.http", app, "--interface", interface, "--max-in-flight", str(max_in_flight)]
    if switch_interval is not None:
        argv += ["--switch-interval", repr(switch_interval)]
    return argv


@dataclass(eq=False)
class Worker:
    """One worker guest as the front sees it."""

    handle: GuestHandle
    client: rpc.Client
    generation: int
    interface: str = "asgi"
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    retiring: bool = False
    dead: bool = False

    @property
    def pid(self) -> Optional[int]:
        return self.handle.pid

    def stats(self) -> Dict[str, Any]:
        return {
            "pid": self.pid,
            "generation": self.generation,
            "interface": self.interface,
            "in_flight": self.in_flight,
            "served": self.served,
            "failed": self.failed,
            "retiring": self.retiring,
        }


class WorkerPool:
    """N workers and the front's queue. acquire() a worker for a request, release() it after."""

    def __init__(self, command: Sequence[str], workers: int, *, max_in_flight: int = 32, queue: int = 1024) -> None:
        if workers < 1 or max_in_flight < 1 or queue < 0:
            raise ValueError("workers and max_in_flight must be at least 1, queue at least 0")
        self.command = list(command)
        self.size = workers
        self.max_in_flight = max_in_flight
        self.queue_limit = queue
        self.workers: List[Worker] = []
        self.waiters: Deque["asyncio.Future[Worker]"] = deque()
        self.generation = 0
        self.replaced = 0
        self.host: Optional[Host] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self._by_peer: Dict[int, Worker] = {}
        self._spawning = 0
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the workers and wait until each answers (raises if one cannot start)."""
        self.loop = asyncio.get_running_loop()
        # Room for a whole new generation beside the old one (reload), and for replacements.
        cfg = SegmentConfig(max_guests=min(255, 2 * self.size + 4), size_classes=((1024, 512), (16 * 1024, 256), (256 * 1024, 64), (1 << 20, 8)))
        self.host = Host(cfg, on_event=self._on_event)
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))

    async def close(self) -> None:
        """Fail queued requests, say goodbye to the workers and wait for them to exit."""
        self._closing = True
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(QueueFull("the server is shutting down"))
        self.waiters.clear()
        host, self.host = self.host, None
        if host is not None:
            await asyncio.get_running_loop().run_in_executor(None, host.close)
        for w in self.workers:
            w.client.close()
        self.workers.clear()

    async def reload(self) -> None:
        """Start a new generation of workers; the old ones take no new request and stop once their
        requests are done: none is lost or failed."""
        old = [w for w in self.workers if not w.retiring]
        self.generation += 1
        await asyncio.gather(*(self._spawn() for _ in range(self.size)))
        for w in old:
            self.retire(w, "reload")
        log.info("reload: generation %d serving, %d old workers draining", self.generation, len(old))

    async def _spawn(self) -> None:
        assert self.host is not None and self.loop is not None
        self._spawning += 1
        try:
            handle = await self.loop.run_in_executor(None, self.host.spawn, self.command)
            client = rpc.Client(handle.link, max_in_flight=2 * self.max_in_flight + 8)
            w = Worker(handle, client, self.generation)
            self._by_peer[handle.peer_id] = w
            try:
                info = await client.acall("ping", timeout=START_TIMEOUT)
            except BaseException:
                handle.kill()
                self._by_peer.pop(handle.peer_id, None)
                client.close()
                raise
            w.interface = str(info["interface"])
            self.workers.append(w)
            log.info("worker pid %s (generation %d, %s) ready", w.pid, w.generation, w.interface)
            self._hand_out()
        finally:
            self._spawning -= 1

    def _replace(self, why: str) -> None:
        if self._closing or self.host is None:
            return
        task = asyncio.ensure_future(self._spawn())

        def done(t: "asyncio.Task[None]") -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("could not start a replacement worker (%s): %s", why, t.exception())

        task.add_done_callback(done)

    # -- death and retirement -------------------------------------------------------------------

    def _on_event(self, ev: HostEvent) -> None:
        """Host monitor thread: a guest exited or died."""
        if ev.kind in ("died", "exited", "recovery_failed") and self.loop is not None:
            try:
                self.loop.call_soon_threadsafe(self._gone, ev.peer_id, ev.reason)
            except RuntimeError:
                pass  # the loop is closed: the front is exiting

    def _gone(self, peer_id: int, reason: str) -> None:
        w = self._by_peer.pop(peer_id, None)
        if w is None or w.dead:
            return
        w.dead = True
        if w in self.workers:
            self.workers.remove(w)
        w.client.close()  # calls still in flight fail (the gateway answers 502 for exactly those)
        if not w.retiring and not self._closing:
            log.warning("worker pid %s died (%s) with %d requests in flight: replacing it", w.pid, reason, w.in_flight)
            self.replaced += 1
            self._replace("a worker died")

    def retire(self, w: Worker, why: str) -> None:
        """Send no new request to w, start its replacement (unless reloading), stop it once idle."""
        if w.retiring or w.dead:
            return
        w.retiring = True
        log.warning("retiring worker pid %s: %s", w.pid, why)
        if why != "reload":
            self.replaced += 1
            self._replace(why)
        self._stop_if_idle(w)

    def _stop_if_idle(self, w: Worker) -> None:
        if w.retiring and w.in_flight == 0 and not w.dead:
            w.handle.kill()  # nothing in flight on it: a stuck handler thread goes with the process

    # -- dispatch -----------------------------------------------------------------------------

    def _least_loaded(self) -> Optional[Worker]:
        best: Optional[Worker] = None
        for w in self.workers:
            if not w.retiring and not w.dead and w.in_flight < self.max_in_flight and (best is None or w.in_flight < best.in_flight):
                best = w
        return best

    async def acquire(self, deadline: float = math.inf) -> Worker:
        """The least-loaded worker with room (counted in flight until release()); waits in the
        queue if none has room. QueueFull if the queue is full, asyncio.TimeoutError at the deadline."""
        w = self._least_loaded()
        if w is not None and not self.waiters:
            w.in_flight += 1
            return w
        if len(self.waiters) >= self.queue_limit:
            raise QueueFull(f"{len(self.waiters)} requests queued (the limit): every worker has {self.max_in_flight} in flight")
        fut: "asyncio.Future[Worker]" = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            timeout = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed a worker just as we gave up: pass it on
            else:
                fut.cancel()
            raise
        finally:
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass

    def release(self, w: Worker, ok: bool = True) -> None:
        """A request on w is over."""
        w.in_flight -= 1
        if ok:
            w.served += 1
        else:
            w.failed += 1
        self._stop_if_idle(w)
        self._hand_out()

    def _hand_out(self) -> None:
        """Give workers with room to queued requests, oldest first."""
        while self.waiters:
            fut = self.waiters[0]
            if fut.done():
                self.waiters.popleft()
                continue
            w = self._least_loaded()
            if w is None:
                return
            self.waiters.popleft()
            w.in_flight += 1
            fut.set_result(w)

    def stats(self) -> Dict[str, Any]:
        """Readiness and per-worker counters (the health endpoint's body)."""
        live = [w for w in self.workers if not w.dead and not w.retiring]
        return {
            "ready": bool(live),
            "generation": self.generation,
            "queued": len(self.waiters),
            "replaced": self.replaced,
            "workers": [w.stats() for w in self.workers],
        }
