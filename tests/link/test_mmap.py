"""Acceptance tests of the mmap tier (large payloads; DECISIONS 4, 11, 15; format-v7 1.5, 1.10;
algorithms 2.9; traps 37-39, 41).

1. Sizes from 0 B to 1 GiB both ways, at every tier boundary and +-1 around it, verified by hash,
   with Message.tier and the slot class checked.
2. Streaming 16 MiB payloads both ways: mappings, fds and RSS stay bounded; killing the guest makes
   the host close every mapping of that link.
3. Control-channel faults are terminal (LinkCorrupted) and close every fd that came with them; an
   unknown mapping is waited for during the grace period only; PayloadTooLarge where no tier fits.

Guests live in tests/guests/mmap_*.py; tests/guests/mmap_content.py is shared with them.
"""

from __future__ import annotations

import array
import fcntl
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import mmap as pymmap

import numpy as np
import pytest

from shmhub import (
    Guest,
    Host,
    LinkCorrupted,
    Message,
    PayloadTooLarge,
    SegmentConfig,
    ShmTimeout,
    bigmap,
)
from shmhub import layout as L
from shmhub.doorbell import Doorbell
from shmhub.link import GUEST, HOST, Link
from shmhub.segment import Segment

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(os.path.dirname(HERE), "guests")
_spec = importlib.util.spec_from_file_location("mmap_content", os.path.join(GUESTS, "mmap_content.py"))
mc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mc)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CONFIG = SegmentConfig(
    max_guests=2, bipbuf_capacity=256 * KiB, max_payload_size=GiB, inline_threshold=256, size_classes=((1024, 256), (16 * KiB, 128), (256 * KiB, 16), (MiB, 8))
)
INLINE_MAX = CONFIG.effective_inline_threshold
SLOT_MAX = CONFIG.max_slot_payload  # largest slot - 4: the last slot-routed size
SEQ = struct.Struct("<Q")
MAX_MAPPINGS = bigmap.MapSender(None).max_mappings  # the sender's cap (16)


def _sizes():
    """Every tier boundary of CONFIG and +-1 around it, plus the mapping-size and big sizes."""
    out = {0, 1, INLINE_MAX - 1, INLINE_MAX, INLINE_MAX + 1}
    for size, _ in CONFIG.size_classes:
        out |= {size - 5, size - 4, size - 3}  # slot_size - 4 fits (u32 length prefix), - 3 does not
    out |= {MiB - 1, MiB, MiB + 1}
    # A mapping is max(1 MiB, next power of two of 4 KiB header + payload): payloads that end exactly
    # at the end of a mapping, and one byte more.
    out |= {2 * MiB - 4097, 2 * MiB - 4096, 2 * MiB - 4095, 16 * MiB - 4096, 16 * MiB, 64 * MiB, 256 * MiB}
    return sorted(out)


SIZES = _sizes()


def expected_tier(n: int) -> str:
    if n <= INLINE_MAX:
        return "inline"
    return "slot" if n <= SLOT_MAX else "mmap"


def expected_slots(n: int) -> list:
    """Slots in use per class while exactly one message of n bytes is held."""
    counts = [0] * len(CONFIG.size_classes)
    if expected_tier(n) == "slot":
        counts[next(i for i, (size, _) in enumerate(CONFIG.size_classes) if size >= n + L.SLOT_LEN_PREFIX)] = 1
    return counts


def test_size_list_covers_the_boundaries():
    assert INLINE_MAX == 256 and SLOT_MAX == MiB - 4
    assert [expected_tier(n) for n in (256, 257, MiB - 4, MiB - 3)] == ["inline", "slot", "slot", "mmap"]
    assert expected_slots(1020) == [1, 0, 0, 0] and expected_slots(1021) == [0, 1, 0, 0]
    assert {0, 1, 255, 256, 257, 1019, 1020, 1021, MiB - 4, MiB - 3, MiB + 1, 256 * MiB} <= set(SIZES)
    assert len(mc.content(5, 3 * MiB + 7)) == 3 * MiB + 7
    assert mc.hash_of(mc.content(5, 3 * MiB + 7)) == mc.digest(5, 3 * MiB + 7) != mc.digest(6, 3 * MiB + 7)


# -- helpers ------------------------------------------------------------------------------------


def spawn(host: Host, script: str, tmp_path, *args):
    """Spawn tests/guests/<script> with stderr in a file (read by guest_err)."""
    err = open(tmp_path / f"{script}.stderr", "w")
    try:
        return host.spawn([sys.executable, os.path.join(GUESTS, script), *args], stderr=err, cwd=GUESTS)
    finally:
        err.close()


def guest_err(tmp_path, script: str) -> str:
    try:
        return (tmp_path / f"{script}.stderr").read_text()[-3000:]
    except FileNotFoundError:
        return ""


def command(link: Link, **cmd) -> None:
    data = json.dumps(cmd).encode()
    assert len(data) <= INLINE_MAX
    link.send(data, timeout=30)


def report(link: Link, timeout: float = 120) -> dict:
    return json.loads(link.recv_bytes(timeout=timeout))


def slots_in_use(seg: Segment) -> list:
    return [seg.pool.counts(c)[1] for c in range(seg.pool.num_classes)]


def rx_leases(link: Link) -> int:
    return sum(m.leases for m in link._maps_rx.maps.values() if not m.region.closed)


def wait_event(host: Host, kind: str, peer_id: int, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        rem = deadline - time.monotonic()
        assert rem > 0, f"no {kind!r} event for peer {peer_id} within {timeout} s; saw {seen}"
        try:
            ev = host.events.get(timeout=rem)
        except Exception:
            continue
        seen.append((ev.kind, ev.peer_id))
        if ev.kind == kind and ev.peer_id == peer_id:
            return ev


def finish(host: Host, g, tmp_path, script: str) -> None:
    host.close()
    assert g.returncode == 0, f"guest exited with {g.returncode}: {guest_err(tmp_path, script)}"


# -- 1. sizes ---------------------------------------------------------------------------------------


def _check_echo(host: Host, link: Link, n: int, seed: int, problems: list) -> None:
    data = mc.content(seed, n)
    want = mc.hash_of(data)
    command(link, op="echo")
    link.send(data, timeout=60)
    del data
    with link.recv(timeout=60) as echo:
        tier, size, got = echo.tier, len(echo), mc.hash_of(echo)
        if tier == "mmap" and np.frombuffer(echo, np.uint8).ctypes.data % 4096:
            problems.append(f"echo of {n}: an mmap payload is not page-aligned (it starts after the 4 KiB map header)")
        rep = report(link)  # the guest released its message before it sent this
        held_slots = slots_in_use(host.segment)
        held_leases = rx_leases(link)
    after = link.mappings
    exp_tier = expected_tier(n)
    if (size, tier, got) != (n, exp_tier, want):
        problems.append(f"echo of {n}: host got {size} B tier {tier} digest ok={got == want}, expected tier {exp_tier}")
    if (rep["n"], rep["tier"], rep["digest"]) != (n, exp_tier, want):
        problems.append(f"host->guest {n}: guest got {rep['n']} B tier {rep['tier']} digest ok={rep['digest'] == want}")
    if rep["slots_in_use"] != expected_slots(n) or held_slots != expected_slots(n):
        problems.append(f"{n}: slots in use guest {rep['slots_in_use']} host {held_slots}, expected {expected_slots(n)}")
    if held_leases != (exp_tier == "mmap"):  # the held echo leases exactly one guest mapping
        problems.append(f"{n}: host holds {held_leases} leases on guest mappings while holding the echo")
    if after["tx_leases"] != 0 or rx_leases(link) != 0:  # the guest released ours; we released theirs
        problems.append(f"{n}: leases left after both released: tx {after['tx_leases']} rx {rx_leases(link)}")


def test_sizes_echo_host_guest_host(tmp_path):
    """Every boundary size up to 256 MiB: host -> guest -> host, a true echo, hashed on both sides."""
    t0 = time.monotonic()
    problems = []
    with Host(CONFIG) as host:
        g = spawn(host, "mmap_echo.py", tmp_path)
        link = g.link
        for n in SIZES:
            _check_echo(host, link, n, seed=n, problems=problems)
        m = link.mappings
        command(link, op="stat")
        gstat = report(link)
        finish(host, g, tmp_path, "mmap_echo.py")
    assert not problems, "\n".join(problems)
    mmap_sizes = [n for n in SIZES if expected_tier(n) == "mmap"]
    # Every mmap payload was sent through a mapping of ours; mappings are reused, never more than the cap.
    assert m["tx_created"] + m["tx_reused"] == len(mmap_sizes), m
    assert m["tx_mappings"] <= MAX_MAPPINGS and gstat["mappings"]["tx_mappings"] <= MAX_MAPPINGS, (m, gstat)
    assert m["tx_reused"] >= 1, m  # 1 MiB +- 1 fit the 2 MiB mapping of 1 MiB - 3
    print(f"\n[sizes echo] {len(SIZES)} sizes, {time.monotonic() - t0:.1f} s, host mappings {m}, guest {gstat['mappings']}")


def test_sizes_guest_initiated(tmp_path):
    """Every boundary size up to 256 MiB built and sent by the guest; the host checks the digest
    against its own independent computation."""
    t0 = time.monotonic()
    problems = []
    with Host(CONFIG) as host:
        g = spawn(host, "mmap_echo.py", tmp_path)
        link = g.link
        for n in SIZES:
            seed = n + 1
            command(link, op="gen", seed=seed, n=n)
            with link.recv(timeout=60) as msg:
                tier, size, got = msg.tier, len(msg), mc.hash_of(msg)
                rep = report(link)
                held = slots_in_use(host.segment)
            want = mc.digest(seed, n)
            if (size, tier, got, rep["digest"]) != (n, expected_tier(n), want, want):
                problems.append(
                    f"guest->host {n}: got {size} B tier {tier} digest ok={got == want} "
                    f"guest digest ok={rep['digest'] == want}, expected tier {expected_tier(n)}"
                )
            if held != expected_slots(n):
                problems.append(f"guest->host {n}: slots in use {held}, expected {expected_slots(n)}")
        command(link, op="stat")
        gstat = report(link)
        finish(host, g, tmp_path, "mmap_echo.py")
    assert not problems, "\n".join(problems)
    gm = gstat["mappings"]
    assert gm["tx_created"] + gm["tx_reused"] >= len([n for n in SIZES if expected_tier(n) == "mmap"]), gm
    assert gm["tx_leases"] == 0, gm  # the host released everything it received
    print(f"\n[sizes guest->host] {len(SIZES)} sizes, {time.monotonic() - t0:.1f} s, guest mappings {gm}")


def _one_gib(tmp_path, true_echo: bool):
    n = GiB
    times = {}
    with Host(CONFIG) as host:
        g = spawn(host, "mmap_echo.py", tmp_path)
        link = g.link
        # host -> guest
        t = time.monotonic()
        data = mc.content(1, n)
        times["host_gen"] = time.monotonic() - t
        t = time.monotonic()
        want = mc.hash_of(data)
        times["host_hash"] = time.monotonic() - t
        command(link, op="echo" if true_echo else "digest")
        t = time.monotonic()
        link.send(data, timeout=120)
        times["host_send"] = time.monotonic() - t
        del data
        if true_echo:
            with link.recv(timeout=120) as echo:
                assert (len(echo), echo.tier) == (n, "mmap")
                assert mc.hash_of(echo) == want, "1 GiB echo differs"
        rep = report(link)
        times["host_to_guest_total"] = time.monotonic() - t
        assert (rep["n"], rep["tier"], rep["digest"]) == (n, "mmap", want), {k: rep[k] for k in ("n", "tier")}
        assert link.mappings["tx_leases"] == 0
        # guest -> host: the same content (seed), so `want` is the independent expectation
        t = time.monotonic()
        command(link, op="gen", seed=1, n=n, hash=False)
        with link.recv(timeout=120) as msg:
            times["guest_to_host_recv"] = time.monotonic() - t
            assert (len(msg), msg.tier) == (n, "mmap")
            t2 = time.monotonic()
            got = mc.hash_of(msg)
            times["host_hash_rx"] = time.monotonic() - t2
            assert rx_leases(link) == 1
        rep = report(link)
        assert got == want, "1 GiB from the guest differs"
        assert rx_leases(link) == 0
        times.update({f"guest_{k}": rep[k] for k in ("gen_s", "send_s")})
        # A payload above max_payload_size is refused before anything is copied (anonymous
        # memory: nothing is touched), and the link stays usable.
        big = pymmap.mmap(-1, n + 1)
        try:
            with pytest.raises(PayloadTooLarge):
                link.send(big, timeout=5)
        finally:
            big.close()
        command(link, op="stat")
        gstat = report(link)
        times["host_rss_mib"] = mc.rss_kib() // 1024
        times["guest_rss_mib"] = gstat["rss_kib"] // 1024
        finish(host, g, tmp_path, "mmap_echo.py")
    print("\n[1 GiB] " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in times.items()))


def test_one_gib_both_directions(tmp_path):
    """1 GiB (= max_payload_size) host -> guest (guest reports its digest) and guest -> host."""
    _one_gib(tmp_path, true_echo=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_gib_true_echo(tmp_path):
    _one_gib(tmp_path, true_echo=True)


# -- 2. streaming, bounded resources, crash ------------------------------------------------------

STREAM_N = 16 * MiB


class Sampler:
    """Samples this process and the guest: RSS, fds, memfd mappings, Link.mappings."""

    def __init__(self, link: Link, guest_pid: int) -> None:
        self.link, self.pid = link, guest_pid
        self.rows = []
        self.t0 = time.monotonic()
        self.next = 0.0

    def maybe(self, force: bool = False) -> None:
        t = time.monotonic() - self.t0
        if force or t >= self.next:
            self.next = t + 0.25
            maps, g_maps = len(mc.map_inodes()), len(mc.map_inodes(self.pid))
            self.rows.append(
                {
                    "t": t,
                    "maps": maps,
                    "rss": mc.rss_kib(),
                    "fds": mc.fd_count(),
                    "g_maps": g_maps,
                    "g_rss": mc.rss_kib(self.pid),
                    "g_fds": mc.fd_count(self.pid),
                    **self.link.mappings,
                }
            )

    def after(self, warmup: float) -> list:
        rows = [r for r in self.rows if r["t"] >= warmup]
        assert len(rows) >= 3, f"too few samples after the {warmup} s warm-up: {self.rows}"
        return rows

    def check_bounded(self, warmup: float, rss_slack_kib: int, label: str) -> dict:
        """After warm-up, in this process and in the guest: the fd count stays within a band of 2;
        at most 2 x max_mappings memfd mappings are mapped (ours and the peer's); and RSS never
        exceeds its warm-up value by more than the extra mappings mapped at that moment explain
        (one 16 MiB payload plus its header, rounded up to 1 MiB, each) plus a slack."""
        rows = self.after(warmup)
        out = {}
        for who in ("", "g_"):
            fds = [r[who + "fds"] for r in rows]
            assert max(fds) - min(fds) <= 2, f"{label}: {who or 'host '}fd count moved {min(fds)}..{max(fds)}: {fds}"
            rss = [r[who + "rss"] for r in rows]
            maps = [r[who + "maps"] for r in rows]
            assert max(maps) <= 2 * MAX_MAPPINGS, f"{label}: {who or 'host '}has {max(maps)} memfd mappings: {maps}"
            for r, m in zip(rss, maps):
                # a mapping is the payload plus its header page rounded up to 1 MiB, allocated up front
                allowed = rss_slack_kib + max(0, m - maps[0]) * ((STREAM_N + MiB) // KiB)
                assert r - rss[0] <= allowed, (
                    f"{label}: {who or 'host '}RSS grew {r - rss[0]} KiB after warm-up with {m - maps[0]} more mappings (allowed {allowed}): {rss}, {maps}"
                )
            out[who + "rss_mib"] = (rss[0] // 1024, max(rss) // 1024, rss[-1] // 1024)
            out[who + "fds"] = (min(fds), max(fds))
            out[who + "maps"] = (min(maps), max(maps))
        return out


def _stream_payload(base: bytearray, seq: int) -> bytearray:
    SEQ.pack_into(base, 0, seq)
    SEQ.pack_into(base, len(base) - 8, seq)
    return base


def _check_stream_payload(msg: Message, seq: int, mid: np.ndarray) -> None:
    assert (msg.tier, len(msg)) == ("mmap", STREAM_N), (msg.tier, len(msg))
    with memoryview(msg) as mv:
        assert SEQ.unpack(mv[:8])[0] == seq and SEQ.unpack(mv[-8:])[0] == seq, f"payload {seq}: wrong sequence"
        assert np.array_equal(np.frombuffer(mv, np.uint64)[1:-1], mid), f"payload {seq}: content differs"


def _stream_and_kill(tmp_path, h2g_seconds: float, g2h_seconds: float) -> None:
    seed = 77
    base = mc.content(seed, STREAM_N)
    mid = np.frombuffer(base, np.uint64)[1:-1].copy()
    maps_before = mc.map_inodes()
    results = {}
    with Host(CONFIG) as host:
        fds_before = mc.fd_count()  # the host without guests
        g = spawn(host, "mmap_stream.py", tmp_path)
        link = g.link
        try:
            command(link, op="sink", n=STREAM_N, seed=seed)
            assert report(link) == {"ok": True}

            # host -> guest for h2g_seconds; the guest checks every payload and releases it.
            s = Sampler(link, g.pid)
            sent = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < h2g_seconds:
                link.send(_stream_payload(base, sent), timeout=30)
                sent += 1
                s.maybe()
                assert link.mappings["tx_mappings"] <= MAX_MAPPINGS
            dt = time.monotonic() - t0
            s.maybe(force=True)
            command(link, op="stat")
            gstat = report(link)
            assert gstat["errors"] == [] and gstat["got"] == sent, gstat
            assert gstat["mappings"]["rx_mappings"] <= MAX_MAPPINGS, gstat["mappings"]
            assert max(r["tx_mappings"] for r in s.rows) <= MAX_MAPPINGS
            results["h2g"] = {
                "sent": sent,
                "seconds": round(dt, 1),
                "MiB_per_s": round(sent * STREAM_N / MiB / dt),
                "host_mappings": link.mappings,
                "guest_rx_mappings": gstat["mappings"]["rx_mappings"],
                **s.check_bounded(min(2.0, h2g_seconds / 4), 32 * 1024, "host->guest stream"),
            }

            # guest -> host for g2h_seconds; the host checks every payload and releases it.
            s = Sampler(link, g.pid)
            command(link, op="source", seconds=g2h_seconds)
            got = 0
            t0 = time.monotonic()
            while True:
                msg = link.recv(timeout=30)
                if msg.tier != "mmap":
                    rep = json.loads(msg.tobytes())
                    msg.release()
                    break
                with msg:
                    _check_stream_payload(msg, got, mid)
                got += 1
                s.maybe()
                assert link.mappings["rx_mappings"] <= MAX_MAPPINGS
            dt = time.monotonic() - t0
            s.maybe(force=True)
            assert rep["sent"] == got and rep["mappings"]["tx_mappings"] <= MAX_MAPPINGS, rep
            results["g2h"] = {
                "received": got,
                "seconds": round(dt, 1),
                "MiB_per_s": round(got * STREAM_N / MiB / dt),
                "guest_tx_mappings": rep["mappings"],
                "host_rx_mappings": link.mappings["rx_mappings"],
                **s.check_bounded(min(1.0, g2h_seconds / 4), 32 * 1024, "guest->host stream"),
            }

            # Both sides hold leases on the other's mappings, then the guest is killed.
            k = 3
            command(link, op="hold", k=k)
            for i in range(k):
                link.send(_stream_payload(base, sent + i), timeout=30)
            held = []
            for i in range(k):
                msg = link.recv(timeout=30)
                _check_stream_payload(msg, got + i, mid)
                held.append(msg)
            rep = report(link)
            assert rep["holding"] == k and rep["errors"] == [], rep
            assert link.mappings["tx_leases"] == k and rx_leases(link) == k, link.mappings
            live = mc.map_inodes() - maps_before
            assert live, "no memfd mapping is visible in /proc/self/maps"
        except BaseException:
            g.kill()
            raise
        g.kill()
        ev = wait_event(host, "died", g.peer_id)
        assert g.process.wait(5) == -9
        # Recovery closed every mapping of the link: ours (the guest's leases are dropped with
        # them) and the guest's (only our held messages keep those alive).
        after = link.mappings
        assert (after["tx_mappings"], after["tx_leases"], after["rx_mappings"]) == (0, 0, 0), after
        pinned = mc.map_inodes() - maps_before
        assert 1 <= len(pinned) <= k and pinned < live, (pinned, live)
        for i, msg in enumerate(held):  # still readable after the guest died
            _check_stream_payload(msg, got + i, mid)
            msg.release()
        held.clear()
        assert mc.map_inodes() - maps_before == set(), "mappings of the dead guest's link are still mapped"
        # Doorbell, pidfd and control socket are gone with the guest: back to the host's own fds.
        assert mc.fd_count() == fds_before, (mc.fd_count(), fds_before)
        results["kill"] = {"event": ev.kind, "reason": ev.reason, "mappings_before_release": len(pinned)}
    print("\n[stream] " + json.dumps(results, default=str))


def test_stream_bounded_then_kill(tmp_path):
    """16 MiB payloads: 10 s host -> guest, 3 s guest -> host, then the guest is killed holding
    leases (and the host holding the guest's): the host closes every mapping of that link."""
    _stream_and_kill(tmp_path, h2g_seconds=10.0, g2h_seconds=3.0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stream_bounded_then_kill_long(tmp_path):
    _stream_and_kill(tmp_path, h2g_seconds=120.0, g2h_seconds=60.0)


# -- 3. control-channel faults, grace period, PayloadTooLarge ------------------------------------


class Pair:
    """An in-process host/guest Link pair over one segment, doorbell and control socketpair."""

    def __init__(self, config: SegmentConfig = CONFIG, features: int = L.KNOWN_FEATURES, control: bool = True) -> None:
        self.seg = Segment.create(config, features=features)
        self.peer = self.seg.peers.reserve()
        self.seg.peers.claim(self.peer)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ca, self.cb = bigmap.socketpair() if control else (None, None)
        self.host = Link(self.seg, self.peer, Doorbell(a), HOST, control=self.ca)
        self.guest = Link(self.seg, self.peer, Doorbell(b), GUEST, control=self.cb)

    def side(self, direction: str):
        """(sender link, receiver link, raw control socket of the sender, ring towards the receiver)."""
        if direction == "h2g":
            return self.host, self.guest, self.ca, self.seg.h2g(self.peer)
        return self.guest, self.host, self.cb, self.seg.g2h(self.peer)

    def close(self) -> None:
        self.guest.close()
        self.host.close()
        self.host._close_maps()  # a host-side Link is torn down by Host recovery; do it by hand here
        self.host.doorbell.close()
        self.seg.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


EVIL = "shmhub-evil"


def make_memfd(
    size: int,
    map_id: int,
    gen: int,
    *,
    magic: bytes = L.MAP_MAGIC,
    hdr_id=None,
    hdr_gen=None,
    leases: int = 0,
    name: str = EVIL,
    payload: bytes = b"",
    seal: bool = True,
) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:  # receivers require the shrink seal (a shrunk mapping would SIGBUS them)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    os.pwrite(fd, magic + struct.pack("<IIII", map_id if hdr_id is None else hdr_id, gen if hdr_gen is None else hdr_gen, leases, 0), 0)
    if payload:
        os.pwrite(fd, payload, L.MAP_HEADER_SIZE)
    return fd


def send_dgram(sock: socket.socket, body: bytes, fds=()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([body], anc)


def attach_body(map_id: int, gen: int, length: int) -> bytes:
    return struct.pack("<IIQ", map_id, gen, length)


def _fault(case: str, ctrl: socket.socket) -> None:
    """Put one malformed attach datagram for map (5, 1) on the control socket; close our fds."""
    good = lambda: make_memfd(MiB, 5, 1)  # noqa: E731
    fds = []
    try:
        if case == "short_body":
            fds = [good()]
            send_dgram(ctrl, attach_body(5, 1, MiB)[:15], fds)
        elif case == "long_body":
            fds = [good()]
            send_dgram(ctrl, attach_body(5, 1, MiB) + b"\0", fds)
        elif case == "empty_body_with_fd":
            fds = [good()]
            send_dgram(ctrl, b"", fds)
        elif case == "oversized_datagram":  # MSG_TRUNC: more than the 256-byte receive buffer
            fds = [good()]
            send_dgram(ctrl, attach_body(5, 1, MiB) + bytes(300), fds)
        elif case == "no_fd":
            send_dgram(ctrl, attach_body(5, 1, MiB))
        elif case == "two_fds":
            fds = [good(), good()]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "five_fds":  # more than the receiver has room for: MSG_CTRUNC
            fds = [good() for _ in range(5)]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "bad_magic":
            fds = [make_memfd(MiB, 5, 1, magic=b"NOTAMAP!")]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "header_map_id_differs":
            fds = [make_memfd(MiB, 5, 1, hdr_id=6)]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "header_generation_differs":
            fds = [make_memfd(MiB, 5, 1, hdr_gen=2)]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "smaller_than_announced":
            fds = [make_memfd(64 * KiB, 5, 1)]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "header_only_length":
            fds = [make_memfd(L.MAP_HEADER_SIZE, 5, 1)]
            send_dgram(ctrl, attach_body(5, 1, L.MAP_HEADER_SIZE), fds)
        elif case == "absurd_length":
            fds = [good()]
            send_dgram(ctrl, attach_body(5, 1, 1 << 62), fds)
        elif case == "unsealed":  # could be shrunk under the receiver's reads (SIGBUS)
            fds = [make_memfd(MiB, 5, 1, seal=False)]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds)
        elif case == "not_a_memfd":
            r, w = os.pipe()
            fds = [r, w]
            send_dgram(ctrl, attach_body(5, 1, MiB), [r])
        elif case == "duplicate":
            fds = [make_memfd(MiB, 5, 1, name="shmhub-good"), good()]
            send_dgram(ctrl, attach_body(5, 1, MiB), fds[:1])
            send_dgram(ctrl, attach_body(5, 1, MiB), fds[1:])
        else:
            raise AssertionError(case)
    finally:
        for fd in fds:
            os.close(fd)


FAULTS = [
    "short_body",
    "long_body",
    "empty_body_with_fd",
    "oversized_datagram",
    "no_fd",
    "two_fds",
    "five_fds",
    "bad_magic",
    "header_map_id_differs",
    "header_generation_differs",
    "smaller_than_announced",
    "header_only_length",
    "absurd_length",
    "unsealed",
    "not_a_memfd",
    "duplicate",
]


@pytest.mark.parametrize("direction", ["h2g", "g2h"])
@pytest.mark.parametrize("case", FAULTS)
def test_malformed_attach_is_terminal_and_closes_its_fds(pair, case, direction):
    sender, receiver, ctrl, ring = pair.side(direction)
    baseline = mc.fd_count()
    _fault(case, ctrl)
    assert mc.fd_count() == baseline  # our copies are closed; the datagram's fds are in flight
    assert ring.write_mmap_ref(5, 1, L.MAP_HEADER_SIZE, 100)
    t0 = time.monotonic()
    with pytest.raises(LinkCorrupted):
        receiver.recv(timeout=5)
    # Terminal at once, not after the grace for an unknown mapping: the bad datagram was not skipped.
    assert time.monotonic() - t0 < bigmap.GRACE_S
    assert mc.fd_count() == baseline, "an fd that came with the malformed datagram was not closed"
    assert mc.map_inodes(name="memfd:" + EVIL) == set(), "a refused mapping is still mapped"
    assert not receiver.alive
    with pytest.raises(LinkCorrupted):  # terminal: every later call says so
        receiver.recv(timeout=0.1)
    with pytest.raises(LinkCorrupted):
        receiver.try_recv()
    with pytest.raises(LinkCorrupted):
        receiver.send(b"x", timeout=1)


def test_guest_link_corrupted_by_malformed_datagram_cross_process(tmp_path):
    """A real guest: the host puts a datagram with two fds before a genuine attach; the guest's
    link becomes terminal at once and the guest's fd count is back where it was."""
    with Host(CONFIG) as host:
        out = tmp_path / "victim.out"
        with open(out, "w") as f:
            g = host.spawn([sys.executable, os.path.join(GUESTS, "mmap_fault.py"), "victim"], stdout=f, stderr=subprocess.STDOUT, cwd=GUESTS)
        link = g.link
        assert "fds" in report(link, timeout=30)
        a, b = make_memfd(MiB, 1, 1), make_memfd(MiB, 1, 1)
        send_dgram(link._control, attach_body(1, 1, MiB), [a, b])
        os.close(a)
        os.close(b)
        link.send(bytes(2 * MiB), timeout=10)  # a real mapping: its attach comes after the bad one
        assert g.wait(30) == 0, out.read_text()
        wait_event(host, "exited", g.peer_id)
        res = json.loads(out.read_text().strip().splitlines()[-1])
    # (Had the bad datagram been skipped, the genuine attach for the same map 1/1 would have been
    # accepted and the payload delivered.)
    assert res["corrupted"], res
    assert res["fds_after"] == res["fds_before"] and res["maps_after"] == 0, res
    assert res["send_after"] == "LinkCorrupted", res


def test_host_link_corrupted_by_guest_datagram_cross_process(tmp_path):
    """A real guest puts an attach whose mapping has a bad magic before a genuine one: the host's
    link to it becomes terminal, the host's fd count is unchanged, the host isolates the guest
    (kills and recovers it: docs/guides/security.md, trust model), and still closes cleanly."""
    with Host(CONFIG) as host:
        before = mc.fd_count()
        g = spawn(host, "mmap_fault.py", tmp_path, "attacker")
        link = g.link
        command(link, op="attack")
        with pytest.raises(LinkCorrupted):  # (skipping the bad datagram would deliver the payload)
            link.recv(timeout=30)
        assert mc.map_inodes(name="memfd:" + EVIL) == set()
        with pytest.raises(LinkCorrupted):
            link.send(b"x", timeout=1)
        assert g.wait(30) == -9, f"guest exited with {g.returncode}, not killed: {guest_err(tmp_path, 'mmap_fault.py')}"
        assert wait_event(host, "died", g.peer_id).reason.startswith("isolated: ")
        assert mc.fd_count() == before  # the bad mapping's fd and every fd of the recovered guest are closed
        host.close()


def test_received_attach_fds_are_close_on_exec(pair, monkeypatch):
    """Trap 33 / DECISIONS 12: every fd is close-on-exec, also the memfd that arrives with an
    attach datagram (a fork+exec in another thread must not inherit it before it is closed)."""
    seen = []
    real = bigmap.Region

    def spy(fd, size, writable=True, *args):
        seen.append(os.get_inheritable(fd))
        return real(fd, size, writable, *args)

    monkeypatch.setattr(bigmap, "Region", spy)
    pair.host.send(bytes(2 * MiB), timeout=5)
    seen_sender = list(seen)  # the sender maps its own memfd (created with MFD_CLOEXEC)
    with pair.guest.recv(timeout=5) as msg:
        assert (msg.tier, len(msg)) == ("mmap", 2 * MiB)
    assert seen_sender == [False] and len(seen) == 2
    assert seen[1] is False, "the received mapping fd was inheritable (no MSG_CMSG_CLOEXEC)"


@pytest.mark.parametrize("ref", [(99, 1), (5, 2)], ids=["unknown_map_id", "unknown_generation"])
def test_unknown_mapping_waits_for_the_grace_period_then_is_terminal(pair, ref):
    """A ref to a mapping never announced (a new map_id, or a known map_id with another
    generation): retried for the grace period (bigmap.GRACE_S = 2 s; a module constant bound as a
    default argument, not configurable per link), then terminal."""
    assert bigmap.GRACE_S == 2.0
    _, receiver, ctrl, ring = pair.side("h2g")
    fd = make_memfd(MiB, 5, 1, leases=1)
    try:
        send_dgram(ctrl, attach_body(5, 1, MiB), [fd])
    finally:
        os.close(fd)
    assert ring.write_mmap_ref(5, 1, L.MAP_HEADER_SIZE, 10)  # the known one is delivered
    with receiver.recv(timeout=5) as msg:
        assert (msg.tier, len(msg)) == ("mmap", 10)
    assert ring.write_mmap_ref(*ref, L.MAP_HEADER_SIZE, 10)
    t0 = time.monotonic()
    with pytest.raises(LinkCorrupted):
        receiver.recv(timeout=10)
    dt = time.monotonic() - t0
    assert bigmap.GRACE_S <= dt < bigmap.GRACE_S + 1.0, dt
    with pytest.raises(LinkCorrupted):
        receiver.recv(timeout=0.1)


def test_ref_overtaking_its_attach_is_delivered_within_grace(pair):
    """Trap 38: the ref and the attach travel on different channels; an attach that arrives
    0.3 s after its ref is still accepted. The receiver's release drops the lease we put in."""
    _, receiver, ctrl, ring = pair.side("h2g")
    payload = os.urandom(3 * MiB)
    fd = make_memfd(4 * MiB, 7, 3, leases=1, payload=payload, name="shmhub-late")
    try:
        assert ring.write_mmap_ref(7, 3, L.MAP_HEADER_SIZE, len(payload))
        timer = threading.Timer(0.3, send_dgram, (ctrl, attach_body(7, 3, 4 * MiB), [fd]))
        t0 = time.monotonic()
        timer.start()
        try:
            msg = receiver.recv(timeout=5)
        finally:
            timer.join()
        assert time.monotonic() - t0 >= 0.3
        with msg:
            assert (msg.tier, len(msg)) == ("mmap", len(payload))
            assert msg.tobytes() == payload
            assert struct.unpack("<I", os.pread(fd, 4, L.MAP_HDR_LEASES))[0] == 1
        assert struct.unpack("<I", os.pread(fd, 4, L.MAP_HDR_LEASES))[0] == 0, "release did not drop the lease"
        assert receiver.alive and receiver.mappings["rx_mappings"] == 1
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "offset,length,ok",
    [
        (L.MAP_HEADER_SIZE, MiB - L.MAP_HEADER_SIZE, True),  # ends exactly at the end of the mapping
        (L.MAP_HEADER_SIZE, MiB - L.MAP_HEADER_SIZE + 1, False),  # one byte past it
        (MiB - 8, 16, False),
        (0, 16, False),  # inside the mapping header
        (L.MAP_HEADER_SIZE - 1, 16, False),
        ((1 << 64) - 8, 16, False),  # offset + length overflows 64 bits
    ],
)
def test_ref_bounds_checked_against_the_mapping(pair, offset, length, ok):
    _, receiver, ctrl, ring = pair.side("g2h")
    fd = make_memfd(MiB, 5, 1, leases=1)
    try:
        send_dgram(ctrl, attach_body(5, 1, MiB), [fd])
    finally:
        os.close(fd)
    assert ring.write_mmap_ref(5, 1, offset, length)
    if ok:
        with receiver.recv(timeout=5) as msg:
            assert (msg.tier, len(msg)) == ("mmap", length)
        assert receiver.alive
    else:
        t0 = time.monotonic()
        with pytest.raises(LinkCorrupted):
            receiver.recv(timeout=5)
        assert time.monotonic() - t0 < bigmap.GRACE_S and not receiver.alive


def test_payload_above_max_payload_size():
    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=64 * KiB, max_payload_size=4 * MiB, size_classes=((1024, 16), (64 * KiB, 4)))
    p = Pair(cfg)
    try:
        for sender, receiver in ((p.host, p.guest), (p.guest, p.host)):
            with pytest.raises(PayloadTooLarge):
                sender.send(bytes(4 * MiB + 1), timeout=1)
            assert sender.mappings["tx_created"] == 0  # refused before a mapping was made
            data = os.urandom(4 * MiB)
            sender.send(data, timeout=5)  # exactly max_payload_size: mmap tier, link still fine
            with receiver.recv(timeout=5) as msg:
                assert (msg.tier, msg.tobytes()) == ("mmap", data)
    finally:
        p.close()


@pytest.mark.parametrize("why", ["no_control_socket", "segment_without_mmap_leases"])
def test_no_mmap_tier_means_payload_too_large_above_the_largest_slot(why):
    p = Pair(control=why != "no_control_socket", features=L.KNOWN_FEATURES & ~L.FEATURE_MMAP_LEASES if why != "no_control_socket" else L.KNOWN_FEATURES)
    try:
        for sender, receiver in ((p.host, p.guest), (p.guest, p.host)):
            assert sender.mappings == {}
            with pytest.raises(PayloadTooLarge):
                sender.send(bytes(SLOT_MAX + 1), timeout=1)
            data = os.urandom(SLOT_MAX)
            sender.send(data, timeout=5)
            with receiver.recv(timeout=5) as msg:
                assert (msg.tier, msg.tobytes()) == ("slot", data)
    finally:
        p.close()


def test_walk_in_guest_has_no_mmap_tier(shm_path):
    """Guest.attach (no control socket): PayloadTooLarge above the largest slot, both ways."""
    with Host(CONFIG, path=shm_path) as host:
        link = Guest.attach(shm_path)
        try:
            ev = wait_event(host, "attached", link.peer_id)
            hlink = host._handles[ev.peer_id].link
            for sender, receiver in ((link, hlink), (hlink, link)):
                assert sender.mappings == {}
                with pytest.raises(PayloadTooLarge):
                    sender.send(bytes(SLOT_MAX + 1), timeout=1)
                with pytest.raises(PayloadTooLarge):
                    sender.send(bytes(16 * MiB), timeout=1)
                data = os.urandom(SLOT_MAX)
                sender.send(data, timeout=5)
                with receiver.recv(timeout=5) as msg:
                    assert (msg.tier, msg.tobytes()) == ("slot", data)
        finally:
            link.close()


# -- leases, reuse, backpressure, retirement (in-process) ----------------------------------------


@pytest.mark.parametrize("direction", ["h2g", "g2h"])
def test_leases_reuse_and_backpressure(pair, direction):
    sender, receiver, _, _ = pair.side(direction)
    tx = sender._maps_tx
    tx.max_mappings = 3
    held = []
    for i in range(3):
        sender.send(mc.content(i, 2 * MiB), timeout=5)
        held.append(receiver.recv(timeout=5))
    m = sender.mappings
    assert (m["tx_mappings"], m["tx_created"], m["tx_leases"]) == (3, 3, 3), m
    assert receiver.mappings["rx_mappings"] == 3
    # Every mapping is leased and the cap is reached: backpressure (a timeout), not a new mapping.
    t0 = time.monotonic()
    with pytest.raises(ShmTimeout):
        sender.send(mc.content(9, 2 * MiB), timeout=0.3)
    assert time.monotonic() - t0 >= 0.3 and sender.stats.mapping_waits == 1
    assert sender.mappings["tx_mappings"] == 3 and sender.mappings["tx_leases"] == 3
    # A blocked sender wakes when the receiver releases a payload.
    threading.Timer(0.2, held[1].release).start()
    t0 = time.monotonic()
    sender.send(mc.content(10, 2 * MiB), timeout=5)
    assert 0.15 <= time.monotonic() - t0 < 2.0
    m = sender.mappings
    assert (m["tx_mappings"], m["tx_created"], m["tx_reused"], m["tx_leases"]) == (3, 3, 1, 3), m
    with receiver.recv(timeout=5) as msg:  # the reused mapping carries the new payload
        assert mc.hash_of(msg) == mc.digest(10, 2 * MiB)
    assert receiver.mappings["rx_mappings"] == 3  # no new attach for a reused mapping
    for i in (0, 2):
        assert mc.hash_of(held[i]) == mc.digest(i, 2 * MiB)  # reuse did not touch leased mappings
        held[i].release()
    assert sender.mappings["tx_leases"] == 0


def test_idle_mappings_are_retired(pair):
    """After a burst, idle mappings beyond max_idle are retired when the sender next sends, and so
    are mappings idle longer than idle_s; the receiver unmaps what was retired."""
    sender, receiver = pair.host, pair.guest
    tx = sender._maps_tx
    burst = tx.max_idle + 4
    held = []
    for i in range(burst):
        sender.send(mc.content(i, 2 * MiB), timeout=5)
        held.append(receiver.recv(timeout=5))
    assert sender.mappings["tx_mappings"] == burst
    for msg in held:
        msg.release()
    held.clear()
    sender.send(mc.content(100, 2 * MiB), timeout=5)  # reuses one of them
    with receiver.recv(timeout=5) as msg:
        assert mc.hash_of(msg) == mc.digest(100, 2 * MiB)
    m = sender.mappings
    assert m["tx_created"] == burst and m["tx_mappings"] <= tx.max_idle + 1, m
    assert receiver.mappings["rx_mappings"] <= tx.max_idle + 1, receiver.mappings
    # Idle longer than idle_s: retired at the next send.
    tx.idle_s = 0.2
    time.sleep(0.3)
    sender.send(mc.content(101, 2 * MiB), timeout=5)
    with receiver.recv(timeout=5) as msg:
        assert mc.hash_of(msg) == mc.digest(101, 2 * MiB)
    assert sender.mappings["tx_mappings"] == 1, sender.mappings
    assert receiver.mappings["rx_mappings"] == 1, receiver.mappings
    assert len(mc.map_inodes()) == 1  # both ends of the pair map that one memfd in this process


def test_attach_send_is_retried_while_the_control_socket_is_full(pair):
    """Trap 39: a full DGRAM control socket (EAGAIN) is retried, not an error."""
    junk = 0
    while True:
        try:
            pair.ca.send(b"J" * 16, socket.MSG_DONTWAIT)
            junk += 1
        except BlockingIOError:
            break
    assert junk > 0

    def drain():
        for _ in range(junk):
            pair.cb.recv(64)

    timer = threading.Timer(0.3, drain)
    t0 = time.monotonic()
    timer.start()
    try:
        pair.host.send(mc.content(3, 2 * MiB), timeout=10)
    finally:
        timer.join()
    assert 0.25 <= time.monotonic() - t0 < bigmap.GRACE_S
    with pair.guest.recv(timeout=5) as msg:
        assert (msg.tier, mc.hash_of(msg)) == ("mmap", mc.digest(3, 2 * MiB))


@pytest.mark.parametrize("direction", ["h2g", "g2h"])
def test_mmap_send_after_the_peer_closed_is_peer_gone_not_corruption(pair, direction):
    """A control socket whose peer is gone (ECONNREFUSED / ENOTCONN) means the peer is gone:
    PeerDead on the host, HostGone on a guest - not LinkCorrupted."""
    from shmhub import HostGone, PeerDead

    sender, receiver, _, _ = pair.side(direction)
    receiver._close_maps()  # what close() / recovery do to the receiver's control socket
    receiver.doorbell.close()
    expected = PeerDead if direction == "h2g" else HostGone
    for _ in range(2):  # and it stays that way
        with pytest.raises(expected):
            sender.send(bytes(2 * MiB), timeout=2)
    assert not sender.alive


def test_sender_blocked_on_leased_mappings_sees_the_guest_die(tmp_path):
    """The guest holds a lease on every mapping the host may create (max_mappings) and is killed
    while the host waits for one: the send raises PeerDead promptly, and recovery closes them all."""
    from shmhub import PeerDead

    n = 2 * MiB
    base = mc.content(5, n)
    with Host(CONFIG) as host:
        fds_before = mc.fd_count()
        g = spawn(host, "mmap_stream.py", tmp_path)
        link = g.link
        try:
            command(link, op="sink", n=n, seed=5)
            assert report(link) == {"ok": True}
            command(link, op="hold", k=MAX_MAPPINGS, send_back=False)
            for i in range(MAX_MAPPINGS):
                link.send(_stream_payload(base, i), timeout=30)
            rep = report(link)
            assert rep["holding"] == MAX_MAPPINGS and rep["errors"] == [], rep
            assert rep["mappings"]["rx_mappings"] == MAX_MAPPINGS
            m = link.mappings
            assert (m["tx_mappings"], m["tx_leases"]) == (MAX_MAPPINGS, MAX_MAPPINGS), m
            with pytest.raises(ShmTimeout):  # nothing to reuse, no room for another: backpressure
                link.send(_stream_payload(base, MAX_MAPPINGS), timeout=0.2)
            killer = threading.Timer(0.3, g.kill)
            killer.start()
            t0 = time.monotonic()
            with pytest.raises(PeerDead):
                link.send(_stream_payload(base, MAX_MAPPINGS), timeout=30)
            dt = time.monotonic() - t0
            killer.join()
        except BaseException:
            g.kill()
            raise
        assert 0.25 <= dt < 3.0, dt
        wait_event(host, "died", g.peer_id)
        m = link.mappings
        assert (m["tx_mappings"], m["tx_leases"], m["rx_mappings"]) == (0, 0, 0), m
        assert mc.map_inodes() == set()
        assert mc.fd_count() == fds_before


# -- return refs: a received payload sent back by reference (FEATURE_MMAP_RETURN) ----------------


def _address(buf) -> int:
    from shmhub._native import buffer_address

    return buffer_address(buf)


@pytest.mark.parametrize("direction", ["h2g", "g2h"])
def test_a_received_payload_goes_back_to_its_sender_by_reference(pair, direction):
    sender, receiver, _, _ = pair.side(direction)
    sender.send(mc.content(1, 3 * MiB), timeout=5)
    got = receiver.recv(timeout=5)
    (m,) = sender._maps_tx.maps
    part = memoryview(got)[MiB : 3 * MiB]  # a slice goes back as itself: its offset travels
    assert receiver.lendable(part) and receiver.lend(part, timeout=5)
    back = sender.recv(timeout=5)
    assert back.tier == "mmap" and len(back) == 2 * MiB
    assert _address(back) == m.region.address + L.MAP_HEADER_SIZE + MiB  # the sender's own memory
    assert bytes(back) == bytes(part)
    assert sender.mappings["tx_leases"] == 2  # the receiver's and the returned payload's
    # Sent on again, it is an ordinary ref into the mapping the receiver already has: no copy.
    assert sender.lend(back, timeout=5)
    again = receiver.recv(timeout=5)
    assert _address(again) == _address(part) and sender.mappings["tx_leases"] == 3
    for held in (part, got, back, again):
        held.release()
    assert sender.mappings["tx_leases"] == 0
    sender.send(mc.content(2, 3 * MiB), timeout=5)  # no lease left: the mapping is reused
    assert sender.mappings["tx_created"] == 1 and sender.mappings["tx_reused"] == 1
    receiver.recv(timeout=5).release()
    assert sender.stats.mapping_waits == receiver.stats.mapping_waits == 0


def test_lend_refuses_memory_outside_the_links_held_mappings(pair):
    sender, receiver, _, _ = pair.side("h2g")
    private = bytes(3 * MiB)
    assert not receiver.lendable(private) and not receiver.lend(private, timeout=5)
    sender.send(mc.content(1, 3 * MiB), timeout=5)
    with receiver.recv(timeout=5) as got:
        assert not receiver.lendable(memoryview(got)[:SLOT_MAX])  # small enough to copy: not lent
    assert not sender.lendable(bytes(3 * MiB))
    other = Pair()
    try:
        other.host.send(mc.content(2, 3 * MiB), timeout=5)
        with other.guest.recv(timeout=5) as foreign:
            assert not receiver.lendable(foreign)  # a payload of another link
    finally:
        other.close()
    assert sender.mappings["tx_leases"] == 0


def test_a_segment_without_the_feature_neither_lends_nor_accepts_return_refs():
    p = Pair(features=L.KNOWN_FEATURES & ~L.FEATURE_MMAP_RETURN)
    try:
        p.host.send(mc.content(1, 2 * MiB), timeout=5)
        with p.guest.recv(timeout=5) as got:
            assert not p.guest.lendable(got) and not p.guest.lend(got, timeout=5)
        (m,) = p.host._maps_tx.maps
        assert p.seg.g2h(p.peer).write_mmap_ref(m.map_id, m.generation, L.MAP_HEADER_SIZE, 100, L.MR_RETURN)
        with pytest.raises(LinkCorrupted, match="FEATURE_MMAP_RETURN"):
            p.host.recv(timeout=5)
    finally:
        p.close()


@pytest.mark.parametrize("case", ["unknown", "no lease", "outside"])
def test_a_bad_return_ref_is_terminal(pair, case):
    sender, receiver, _, _ = pair.side("g2h")  # the guest sends, the host gets refs back
    sender.send(mc.content(1, 2 * MiB), timeout=5)
    got = receiver.recv(timeout=5)
    (m,) = sender._maps_tx.maps
    map_id, off, n = m.map_id, L.MAP_HEADER_SIZE, 100
    if case == "unknown":
        map_id += 7
    elif case == "no lease":
        got.release()  # the mapping's only lease goes: a return ref to it names memory we may reuse
    else:
        off, n = m.size - 8, 16
    assert pair.seg.h2g(pair.peer).write_mmap_ref(map_id, m.generation, off, n, L.MR_RETURN)
    with pytest.raises(LinkCorrupted, match="return ref"):
        sender.recv(timeout=5)
    assert not sender.alive
    if case != "no lease":
        got.release()
