"""Hostile guests (issue 17): a guest that writes random bytes over shared structures must never
crash, hang or leak the host, and the host isolates it when it detects it.

Each trial spawns tests/guests/scribbler.py with a seed and a target (its own G2H or H2G ring, its
peer entry, the pool metadata, the segment header). The scribbler streams inline and slot
payloads, scribbles at a seeded instant, then keeps sending or sleeps. Meanwhile the host drains
it (recv, try_recv or recv_any, seeded), sends some of it back, and round-trips checked payloads
with a well-behaved echo guest. What is asserted is what the design guarantees
(docs/guides/security.md, trust model):

* every host call returns or raises a typed ShmhubError within its timeout (no hang, no other
  exception, no segfault: that would end this process), and the host's threads stay alive;
* a scribbler whose structures failed validation on a host receive is isolated: an "isolated"
  event, its process killed, its recovery done (peer entry Empty);
* after every trial's recovery the segment still validates for a new attach (recovery restores
  the fields only the host writes), and the next trial's guest attaches and works;
* the host closes cleanly at the end of each round, leaving no fd, child or /dev/shm file.

What is *not* asserted, because the design does not guarantee it: that a scribble is detected (a
plausible index or length passes every check), or that the other guest is unharmed (pool metadata
and the header are shared; a scribbled host_goodbye or free list reaches everyone). Those are
counted: a trial whose pool or bystander is damaged ends its round, and the next round starts a
fresh host. The figures are printed (`-s`).
"""

from __future__ import annotations

import os
import queue
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Optional

import pytest

from shmhub import Host, SegmentConfig
from shmhub import layout as L
from shmhub.errors import LinkCorrupted, ShmhubError, ShmTimeout
from shmhub.segment import Segment

GUESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guests")
SCRIBBLER = os.path.join(GUESTS, "scribbler.py")
ECHO = os.path.join(GUESTS, "echo.py")
IDLE = os.path.join(GUESTS, "idle.py")

# Small rings and pools (one growable class) so a few hundred messages wrap rings and cycle slots.
CONFIG = SegmentConfig(max_guests=4, bipbuf_capacity=8 * 1024, size_classes=((512, 32), (4096, 16), (16 * 1024, 4, 2)))
TARGETS = ("g2h", "h2g", "peer", "pool", "header")
CALL_TIMEOUT = 2.0  # every host call in a trial is bounded by this
HANG = CALL_TIMEOUT + 8.0  # a call taking longer than this is a hang (generous: a busy machine)
TRIAL_LIMIT = 30.0  # a scribbler that has not finished by then is killed (it bounds its own sends)


class HostFailure(AssertionError):
    pass


class Trial:
    """One scribbler run against a live host and echo guest."""

    def __init__(self, bench: "Bench", seed: int) -> None:
        self.bench, self.seed = bench, seed
        rng = random.Random(seed)
        self.target = TARGETS[seed % len(TARGETS)]
        self.mode = rng.choice(("recv", "try_recv", "recv_any"))
        self.rng = rng
        self.scribble = ""
        self.errors: Counter = Counter()  # typed errors the host's calls raised, by class name
        self.echo_failed: Optional[str] = None

    def call(self, fn, *args, **kw):
        """A host call: must return or raise a ShmhubError, within HANG seconds."""
        t0 = time.monotonic()
        try:
            return fn(*args, **kw)
        except ShmhubError as e:
            self.errors[type(e).__name__] += 1
            raise
        except Exception as e:
            raise HostFailure(f"host call {getattr(fn, '__name__', fn)} raised {type(e).__name__}: {e}") from e
        finally:
            took = time.monotonic() - t0
            if took > HANG:
                raise HostFailure(f"host call {getattr(fn, '__name__', fn)} took {took:.1f} s (timeout {CALL_TIMEOUT} s): a hang")

    def run(self) -> Dict[str, object]:
        g = self.call(self.bench.host.spawn, [sys.executable, SCRIBBLER, str(self.seed), self.target], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            return self._run(g)
        finally:
            if g.process is not None and g.process.poll() is None:
                g.kill()
            g.wait(HANG)
            g.process.stdout.close()

    def _run(self, g) -> Dict[str, object]:
        b = self.bench
        lines = _Lines(g.process.stdout)
        done = False
        deadline = time.monotonic() + TRIAL_LIMIT
        while time.monotonic() < deadline and not g.isolated:
            if not self.echo_failed:  # once harmed, it may only time out: not every pass
                self.echo_failed = b.echo_round(self)
            drained = self.drain(g)
            for line in lines():
                if line.startswith("scribbled"):
                    self.scribble = line
                elif line.startswith("done"):
                    done = True
            if done and drained and not g.isolated:
                break
        self.drain(g)  # what it sent after "done": a host receive is where corruption shows
        if not self.scribble and not g.isolated:
            raise HostFailure("the scribbler never attached: the last recovery left the segment unusable")
        if not g.isolated:
            g.kill()
        b.wait_recovered(g)
        self.flush_backlog(g)
        harmed = self.echo_failed or b.echo_harmed(self)
        return {
            "isolated": bool(g.isolated),
            "harmed": harmed,
            "pool_damaged": b.pool_damaged(),
            "errors": dict(self.errors),
        }

    def flush_backlog(self, g) -> None:
        """Frames recovery took out of the dead scribbler's ring hold their slots until received."""
        for _ in range(10_000):
            try:
                msg = self.call(g.link.try_recv)
            except ShmhubError:
                return
            if msg is None:
                return
            msg.release()
        raise HostFailure("the recovered scribbler's backlog never ends")

    def drain(self, g) -> bool:
        """Receive what the scribbler sent (the seeded mode), echo some of it back; True once empty."""
        host, rng = self.bench.host, self.rng
        for _ in range(64):
            try:
                if self.mode == "recv_any":
                    try:
                        h, msg = self.call(host.recv_any, timeout=0.01)
                    except ShmTimeout:
                        return True
                    if h is not g:  # a late echo reply (a round trip that timed out)
                        msg.release()
                        continue
                elif self.mode == "try_recv":
                    msg = self.call(g.link.try_recv)
                    if msg is None:
                        return True
                else:
                    try:
                        msg = self.call(g.link.recv, timeout=0.01)
                    except ShmTimeout:
                        return True
                with msg:
                    if rng.random() < 0.3:
                        self.call(g.link.try_send, msg)  # h2g traffic; False (full) is fine
            except ShmhubError:
                return True  # corrupted, dead or recovered: typed, and isolation is the host's job
        return False


class Bench:
    """A host with one echo guest; rebuilt when a trial damaged what everyone shares."""

    def __init__(self) -> None:
        self.host = Host(CONFIG)
        self.echo = self.host.spawn([sys.executable, ECHO, "--copy"], stderr=subprocess.DEVNULL)
        self.seq = 0
        # Attached before any scribbler runs: a guest attaching while the header is scribbled fails.
        why = self.echo_round(Trial(self, -1), timeout=30.0)
        if why:
            self.host.close()
            raise HostFailure(f"a fresh host does not serve its echo guest: {why}")
        self.events: List = []

    def echo_round(self, t: Trial, timeout: float = CALL_TIMEOUT) -> Optional[str]:
        """One checked round trip with the well-behaved guest; what went wrong, or None."""
        self.seq += 1
        rng = random.Random(self.seq)
        n = rng.randint(1, 200) if rng.random() < 0.7 else rng.randint(300, 3000)
        data = rng.randbytes(n)
        link = self.echo.link
        try:
            t.call(link.send, data, timeout=timeout)
            got = t.call(link.recv_bytes, timeout=timeout)
        except ShmhubError as e:
            return f"{type(e).__name__}: {e}"
        return None if got == data else f"echo of {n} bytes came back different ({len(got)} bytes)"

    def echo_harmed(self, t: Trial) -> Optional[str]:
        for _ in range(3):
            why = self.echo_round(t)
            if why:
                return why
        return None

    def wait_recovered(self, g) -> None:
        """The scribbler, killed or isolated, is recovered: its peer entry is Empty again."""
        deadline = time.monotonic() + HANG
        while not g.recovered:
            rem = deadline - time.monotonic()
            if rem <= 0:
                raise HostFailure(f"guest {g.peer_id} (isolated: {g.isolated}) not recovered within {HANG} s")
            try:
                self.events.append(self.host.events.get(timeout=rem))
            except queue.Empty:
                pass
        self.events += _drain_queue(self.host.events)
        state = self.host.segment.region.load_u32(self.host.segment.layout.peer_entry_offset(g.peer_id) + L.PEER_STATE)
        if state != L.PEER_EMPTY:
            raise HostFailure(f"guest {g.peer_id}'s peer entry is in state {state} after recovery, not Empty")
        if not (self.host._monitor.is_alive() and self.host._attention.is_alive()):
            raise HostFailure("a host thread died")
        # A new guest must still be able to attach: the recovery restored what only the host writes.
        try:
            Segment.attach(self.host.segment.fd, writable=False).close()
        except ShmhubError as e:
            raise HostFailure(f"the segment no longer validates after recovery: {e}") from e

    def pool_damaged(self) -> Optional[str]:
        """Whether the pool is no longer whole: every slot Free and on its free list (a class may
        have grown: a guest can ask for growth, or exhaust a class)."""
        pool = self.host.segment.pool
        for c in range(pool.num_classes):
            if pool.counts(c)[1]:
                return f"class {c}: {pool.counts(c)[1]} slots still allocated"
            _, count = pool.class_info(c)
            total = count * pool.mapped_extents(c)
            _, idx = pool.free_head(c)
            seen = set()
            while idx != L.EMPTY_INDEX:
                if idx >= total or idx in seen:
                    return f"class {c}: free list broken at index {idx}"
                seen.add(idx)
                _, state, _, idx = pool.slot_meta(c, idx % count, idx // count)
                if state != L.SLOT_FREE:
                    return f"class {c}: an allocated slot is on the free list"
            if len(seen) != total:
                return f"class {c}: {total - len(seen)} slots off the free list"
        return None

    def close(self) -> None:
        t0 = time.monotonic()
        self.host.close(timeout=5.0)
        if time.monotonic() - t0 > HANG:
            raise HostFailure(f"host.close() took {time.monotonic() - t0:.1f} s")


class _Lines:
    """Complete lines readable now from a pipe, without blocking (raw reads: a buffered reader
    would hold a second line where select() no longer sees it)."""

    def __init__(self, f) -> None:
        self.fd, self.buf = f.fileno(), b""

    def __call__(self) -> List[str]:
        while select.select([self.fd], [], [], 0)[0]:
            chunk = os.read(self.fd, 4096)
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [x.decode().strip() for x in lines]


def _drain_queue(q) -> List:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out


def run_trials(seeds, report) -> None:
    outcomes: Counter = Counter()
    errors: Counter = Counter()
    events: Counter = Counter()  # host events of the scribblers' recoveries, over every host
    failures: List[str] = []
    rounds = ran = 0
    late: Optional[str] = "not reached"
    t0 = time.monotonic()
    bench = Bench()
    try:
        for seed in seeds:
            t = Trial(bench, seed)
            ran += 1
            try:
                r = t.run()
            except HostFailure as e:
                failures.append(f"seed {seed} target {t.target} mode {t.mode} ({t.scribble}): {e}")
                break  # the host is suspect: stop here (close() below is still checked)
            errors.update(r["errors"])
            kind = "isolated" if r["isolated"] else "undetected"
            kind += "+pool-damaged" if r["pool_damaged"] else ""
            kind += "+bystander-harmed" if r["harmed"] else ""
            events.update(ev.kind for ev in bench.events)
            bench.events.clear()
            outcomes[(t.target, kind)] += 1
            outcomes[kind] += 1
            if r["harmed"] or r["pool_damaged"]:
                bench.close()  # must close cleanly even so; then a fresh host for the next trials
                bench = Bench()
                rounds += 1
        else:
            # Late damage to the echo guest (a scribble it trips over after its trial's checks) is
            # counted, not failed: the guarantee is that the host closes cleanly all the same.
            late = bench.echo_harmed(Trial(bench, -1))
    finally:
        try:
            bench.close()
        except HostFailure as e:
            failures.append(str(e))
        elapsed = time.monotonic() - t0
        report(
            f"\nhostile guests: {ran} of {len(seeds)} trials in {elapsed:.1f} s, {rounds + 1} host(s)\n"
            f"  outcomes: {dict(sorted((k, v) for k, v in outcomes.items() if isinstance(k, str)))}\n"
            f"  by target: {dict(sorted((f'{k[0]}/{k[1]}', v) for k, v in outcomes.items() if isinstance(k, tuple)))}\n"
            f"  typed errors seen by host calls: {dict(errors)}\n"
            f"  host events around the scribblers' recoveries: {dict(events)}\n"
            f"  final exchange with the last echo guest: {late or 'ok'}\n"
            f"  host failures: {len(failures)}"
        )
    assert not failures, "\n".join(failures)


def test_hostile_guests(capsys):
    """50 seeded trials, 10 per target (make test)."""
    run_trials(list(range(50)), lambda s: print(s))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_hostile_guests_1000():
    run_trials(list(range(1000, 2000)), lambda s: print(s))


# -- regressions: what a scribbling guest could do to the host before -----------------------------


def _spawn_idle(host):
    g = host.spawn([sys.executable, IDLE])
    deadline = time.monotonic() + 10
    while host.segment.peers.state(g.peer_id) != L.PEER_ATTACHED:  # it claims its entry once mapped
        assert time.monotonic() < deadline, "idle guest did not attach"
        time.sleep(0.01)
    return g


def _events_until(host, kind: str, peer_id: int, timeout: float = 10.0) -> List:
    seen, deadline = [], time.monotonic() + timeout
    while True:
        ev = host.events.get(timeout=max(0.0, deadline - time.monotonic()))
        seen.append(ev)
        if ev.kind == kind and ev.peer_id == peer_id:
            return seen


def test_recovery_survives_a_scribbled_peer_state():
    """An unknown state in a dead guest's peer entry made recovery give up at its first step:
    rings not reset, slots not reclaimed, the entry never Empty again (a peer id lost for good)."""
    with Host(CONFIG) as host:
        g = _spawn_idle(host)
        seg = host.segment
        slot = seg.pool.alloc_in_class(0, g.peer_id)  # a slot the guest holds
        assert slot is not None
        seg.region.store_u32(seg.layout.peer_entry_offset(g.peer_id) + L.PEER_STATE, 77)
        g.kill()
        seen = _events_until(host, "died", g.peer_id)
        assert [ev for ev in seen if ev.kind == "recovery_failed"] == []
        assert seg.peers.state(g.peer_id) == L.PEER_EMPTY
        assert seg.pool.counts(0) == (32, 0)
        g.wait(10)


def test_recovery_restores_what_only_the_host_writes():
    """A guest that wrote over its ring capacity, its entry's ring offset, the header and a class
    header left a segment no new guest could attach to (every attach validates them all)."""
    with Host(CONFIG) as host:
        g = _spawn_idle(host)
        # Stopped while we play the guest's part: the idle guest polls host_goodbye and would leave
        # (and be recovered) halfway through the writes below.
        g.process.send_signal(signal.SIGSTOP)
        seg, lay = host.segment, host.segment.layout
        r = seg.region
        r.store_u32(lay.g2h_offset(g.peer_id) + L.RING_CAPACITY, 64)
        r.store_u64(lay.peer_entry_offset(g.peer_id) + L.PEER_RING_OFFSET, 12345)
        r.store_u32(L.HDR_NUM_CLASSES, 9)
        r.write(L.HDR_MAGIC, b"XXXXXXXX")
        r.store_u32(L.HDR_HOST_GOODBYE, 1)  # every guest would leave, and every new one at once
        r.store_u32(lay.classes[1].header_offset + L.CLS_SLOT_COUNT, 3)
        r.store_u32(lay.classes[2].header_offset + L.CLS_EXTENT_COUNT, 2)
        r.store_u32(lay.classes[0].header_offset + L.CLS_MAX_EXTENTS, 0xFFFF)  # seed 1828 of the slow run
        with pytest.raises(ShmhubError):
            Segment.attach(seg.fd, writable=False)
        g.kill()
        _events_until(host, "died", g.peer_id)
        Segment.attach(seg.fd, writable=False).close()
        assert not seg.host_goodbye
        g2 = _spawn_idle(host)  # and a new guest attaches and runs
        assert g2.alive
        g.wait(10)


def test_a_read_index_scribbled_while_a_slot_frame_is_taken_frees_the_slot():
    """The host takes a slot frame's slot (it becomes the owner, DECISIONS 9) before it releases
    the frame's ring bytes. A guest that scribbles the ring's read index in between makes that
    release raise LinkCorrupted; the slot, the host's by then, was left allocated for good (no
    recovery reclaims a slot the host owns). It is freed now."""
    from shmhub.link import GUEST, HOST, Link

    with Segment.create(CONFIG) as seg:
        peer = seg.peers.attach()
        host, guest = Link(seg, peer, None, HOST), Link(seg, peer, None, GUEST)
        try:
            guest.send(b"s" * 400)  # above the inline threshold: the 512-byte class
            frame = host._rx.read_frame()
            assert frame is not None and frame[0] == L.KIND_SLOT_REF and seg.pool.counts(0) == (31, 1)
            seg.region.store_u32(seg.layout.g2h_offset(peer) + L.RING_READ, 0xFFFF0000)  # the scribble
            with pytest.raises(LinkCorrupted):
                host._take_frame(frame)
            assert seg.pool.counts(0) == (32, 0), "the slot the host took is still allocated"
        finally:
            guest.close()
            host.close()


def test_corrupt_frame_isolates_the_guest(caplog):
    """A malformed frame in a guest's G2H ring: the host's receive raises LinkCorrupted, and the
    host isolates the guest (kills it, recovers it, an "isolated" event and a WARNING)."""
    with Host(CONFIG) as host:
        g = _spawn_idle(host)
        ring_off = host.segment.layout.g2h_offset(g.peer_id)
        r = host.segment.region
        r.write(ring_off + L.RING_HEADER_SIZE, (3).to_bytes(4, "little") + bytes(4))  # total_len 3 < 8
        r.store_u32(ring_off + L.RING_WRITE, 8)
        with caplog.at_level("WARNING", logger="shmhub"):
            with pytest.raises(LinkCorrupted):
                g.link.recv(timeout=1.0)
            seen = _events_until(host, "died", g.peer_id)
        kinds = [ev.kind for ev in seen if ev.peer_id == g.peer_id]
        assert "isolated" in kinds
        died = [ev for ev in seen if ev.kind == "died" and ev.peer_id == g.peer_id][0]
        assert died.reason.startswith("isolated: ")
        assert any("isolated" in rec.getMessage() and rec.levelname == "WARNING" for rec in caplog.records)
        assert g.wait(10) == -9  # killed: a corrupt guest is not left running over the shared segment
        assert host.segment.peers.state(g.peer_id) == L.PEER_EMPTY
        with pytest.raises(LinkCorrupted):
            g.link.recv(timeout=0)  # the link stays corrupted (DECISIONS 6)


@pytest.mark.parametrize("how", ["send", "try_send", "send_many"])
def test_a_send_that_finds_the_ring_scribbled_isolates_the_guest(how):
    """The guest wrote its H2G ring's read index out of range: the host's next send that looks at
    it raises LinkCorrupted, and the host isolates the guest as a receive would (the core's fast
    path and the Python paths alike)."""
    with Host(CONFIG) as host:
        g = _spawn_idle(host)
        ring_off = host.segment.layout.h2g_offset(g.peer_id)
        host.segment.region.store_u32(ring_off + L.RING_READ, CONFIG.bipbuf_capacity + 64)
        payload = b"x" * 1000
        with pytest.raises(LinkCorrupted):
            for _ in range(4 * CONFIG.bipbuf_capacity // len(payload)):  # until it refreshes the read index
                if how == "send":
                    g.link.send(payload, timeout=1.0)
                elif how == "try_send":
                    g.link.try_send(payload)
                else:
                    g.link.send_many([payload, payload], timeout=1.0)
        died = _events_until(host, "died", g.peer_id)[-1]
        assert died.reason.startswith("isolated: "), died
        assert g.wait(10) == -9
        assert host.segment.peers.state(g.peer_id) == L.PEER_EMPTY


def test_growth_ignores_a_scribbled_current_size():
    """A guest that wrote a smaller current_size made the next growth place its extent over live
    data (the first extent, or the rings): growth now appends after the file's end."""
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=4096, size_classes=((4096, 4, 3),))
    seg = Segment.create(cfg)
    try:
        assert seg.grow_class(0)
        first = seg.extent_offsets(0)[0]
        seg.region.store_u64(L.HDR_CURRENT_SIZE, seg.layout.total_size)
        assert seg.grow_class(0)
        second = seg.extent_offsets(0)[1]
        _, size = L.extent_layout(4096, 4)
        assert second >= first + size, f"second extent at {second} overlaps the first ({first}..{first + size})"
    finally:
        seg.close()


def test_nobody_can_shrink_an_anonymous_segment():
    """Every guest holds the segment's fd: an ftruncate to less would kill every process touching
    the lost pages with SIGBUS, the host's included. The memfd is sealed against shrinking; growth
    still works (and a growth whose mapping fails leaves the file as it was)."""
    import errno

    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=4096, size_classes=((4096, 4, 3),))
    seg = Segment.create(cfg)
    try:
        size = os.fstat(seg.fd).st_size
        peer_fd = os.open(f"/proc/self/fd/{seg.fd}", os.O_RDWR)  # as a guest's own descriptor
        try:
            with pytest.raises(PermissionError) as ei:
                os.ftruncate(peer_fd, 4096)
            assert ei.value.errno == errno.EPERM
        finally:
            os.close(peer_fd)
        assert os.fstat(seg.fd).st_size == size
        assert seg.grow_class(0) and os.fstat(seg.fd).st_size > size
        slot = seg.pool.alloc_in_class(0, 1)  # the pool still works across the grown file
        assert slot is not None
    finally:
        seg.close()


def test_isolating_a_bootstrapped_guest_kills_it_through_its_pidfd(tmp_path):
    """A socket walk-in in another process has no process handle, but the host took a pidfd of its
    SO_PEERCRED pid at the bootstrap: isolation kills it (as a spawned guest), then recovers it."""
    sock = str(tmp_path / "hub.sock")
    with Host(CONFIG) as host:
        host.listen(sock)
        proc = subprocess.Popen([sys.executable, os.path.join(GUESTS, "fault_guest.py"), "echo", str(tmp_path / "out.json"), sock])
        try:
            ev = host.events.get(timeout=HANG)
            while ev.kind != "attached":
                ev = host.events.get(timeout=HANG)
            (g,) = host.guests
            assert g.process is None and g.pid == ev.pid == proc.pid
            g.link.send(b"ping", timeout=5)
            assert g.link.recv_bytes(timeout=5) == b"ping"
            host.isolate(g, "application checksum failed")
            assert proc.wait(HANG) == -9
            died = _events_until(host, "died", g.peer_id)[-1]
            assert died.reason == "isolated: application checksum failed" and died.pid == proc.pid
            assert host.segment.peers.state(g.peer_id) == L.PEER_EMPTY
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(HANG)


def test_corrupt_walk_in_is_recovered(tmp_path):
    """A guest whose process the host cannot stop (a socket walk-in here in this very process: no
    pidfd of our own pid) is only recovered, from the monitor thread (recovery takes the link's
    receive lock, which the detecting receive holds)."""
    import shmhub

    with Host(CONFIG) as host:
        host.listen(str(tmp_path / "hub.sock"))
        link = shmhub.connect(str(tmp_path / "hub.sock"), timeout=5)
        try:
            _events_until(host, "attached", link.peer_id)
            (g,) = host.guests
            assert g.process is None
            ring_off = host.segment.layout.g2h_offset(g.peer_id)
            r = host.segment.region
            r.write(ring_off + L.RING_HEADER_SIZE, (3).to_bytes(4, "little") + bytes(4))
            r.store_u32(ring_off + L.RING_WRITE, 8)
            with pytest.raises(LinkCorrupted):
                g.link.try_recv()
            seen = _events_until(host, "died", g.peer_id)
            assert "isolated" in [ev.kind for ev in seen]
            assert host.segment.peers.state(g.peer_id) == L.PEER_EMPTY
        finally:
            link.close()
