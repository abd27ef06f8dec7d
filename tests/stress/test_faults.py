"""Fault injection (issue 17, docs/hardening.md "Fault injection"): ENOSPC, ENOMEM and EFBIG at
segment creation and growth, EMFILE at the mmap-tier attach and the bootstrap, a SIGSTOPped
walk-in guest with heartbeats on, a host SIGKILLed while its guests are mid-send. Each ends in a
typed error or a recovery; what was acknowledged before the fault arrives; no fd, child or
/dev/shm file is left (the autouse fixture of tests/conftest.py checks the last three).

Faults come from the kernel where that is deterministic (a 1 MiB tmpfs, rlimits in a child or,
restored at once, in this process) and from a patched syscall where it is not (an mmap refusing
with ENOMEM at one precise step)."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

import shmhub
from shmhub import Host, Segment, SegmentConfig
from shmhub import layout as L
from shmhub import segment as segment_mod
from shmhub.errors import InsufficientSharedMemory, ResourceExhausted

sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "link")))
from linkutil import GUESTS  # noqa: E402  (tests/link/linkutil.py: also puts tests/guests on sys.path)
from linkutil import wait_event as events, wait_until  # noqa: E402

from common import leave_free  # noqa: E402

TIMEOUT = 20.0
GROWABLE = SegmentConfig(max_guests=2, bipbuf_capacity=8192, size_classes=((4096, 16, 4),))
MMAP_CFG = SegmentConfig(max_guests=2, bipbuf_capacity=8192, size_classes=((1024, 16),))


def script(name: str, *args: object) -> list:
    return [sys.executable, os.path.join(GUESTS, name), *map(str, args)]


def fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def read_report(path: str, proc: subprocess.Popen | None = None, timeout: float = TIMEOUT) -> dict:
    def ready():
        if proc is not None and proc.poll() not in (None, 0):
            raise AssertionError(f"{path}: the guest exited {proc.returncode} without a report")
        return os.path.exists(path)

    wait_until(ready, timeout, f"report {path}")
    with open(path) as f:
        return json.load(f)


@contextmanager
def free_fds(n: int):
    """Lower this process's RLIMIT_NOFILE so that exactly n more fds fit; restored on exit."""
    old = leave_free(n)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@contextmanager
def small_tmpfs(path: str, size: str = "1m"):
    os.makedirs(path)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "none", path], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        os.rmdir(path)
        pytest.skip(f"cannot mount a small tmpfs here (needs root / CAP_SYS_ADMIN): {e}")
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=True, timeout=10)
        os.rmdir(path)


def fill(directory: str) -> str:
    """Fill a filesystem with one file until ENOSPC; returns its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return path
    finally:
        os.close(fd)


class _Enomem:
    """Region(...) that raises ENOMEM on chosen calls (counted from 1) of one module."""

    def __init__(self, real, fail_on) -> None:
        self.real, self.fail_on, self.calls = real, set(fail_on), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail_on:
            raise OSError(errno.ENOMEM, "Cannot allocate memory (injected)")
        return self.real(*args, **kwargs)


# -- creation --------------------------------------------------------------------------------


def test_create_on_full_tmpfs_is_typed_and_leaves_nothing(tmp_path):
    """A named segment on a 1 MiB tmpfs: too big -> InsufficientSharedMemory(ENOSPC) naming the
    fix, no file and no fd left; after filling the tmpfs even a small one fails the same way."""
    with small_tmpfs(str(tmp_path / "mnt")) as mnt:
        before = fds()
        big = SegmentConfig(max_guests=1, bipbuf_capacity=4096, size_classes=((4096, 512),))  # 2 MiB
        with pytest.raises(InsufficientSharedMemory) as ei:
            Segment.create(big, path=os.path.join(mnt, "big"))
        assert ei.value.errno == errno.ENOSPC and isinstance(ei.value, OSError)
        assert mnt in str(ei.value) and "clean" in str(ei.value)
        filler = fill(mnt)
        with pytest.raises(InsufficientSharedMemory) as ei:
            Segment.create(GROWABLE, path=os.path.join(mnt, "small"))
        assert ei.value.errno == errno.ENOSPC
        assert sorted(os.listdir(mnt)) == ["filler"] and fds() == before
        os.unlink(filler)
        with Segment.create(GROWABLE, path=os.path.join(mnt, "small")) as seg:  # room again: it works
            assert seg.alloc(100, 0) is not None


@pytest.mark.parametrize("call", [1, 2], ids=["format-mapping", "attach-mapping"])
@pytest.mark.parametrize("named", [False, True], ids=["memfd", "named"])
def test_create_enomem_at_mapping_is_typed_and_leaves_nothing(monkeypatch, shm_path, call, named):
    """mmap refusing with ENOMEM (overcommit, a cgroup) at either of creation's two mappings:
    InsufficientSharedMemory(ENOMEM), no fd and no file. (Before: a raw OSError, and a failure of
    the second mapping left the named file behind.)"""
    before = fds()
    monkeypatch.setattr(segment_mod, "Region", _Enomem(segment_mod.Region, {call}))
    with pytest.raises(InsufficientSharedMemory) as ei:
        Segment.create(GROWABLE, path=shm_path if named else None)
    assert ei.value.errno == errno.ENOMEM
    assert not os.path.exists(shm_path) and fds() == before


@pytest.mark.parametrize("mode", ["create-as", "grow-fsize", "grow-as"])
def test_rlimits_at_creation_and_growth(mode):
    """Real kernel refusals in a child: RLIMIT_AS at creation (ENOMEM), RLIMIT_FSIZE at growth
    (EFBIG, SIGXFSZ ignored), RLIMIT_AS at growth (the extent's mmap: ENOMEM). Each is a typed
    InsufficientSharedMemory with its errno, leaks no fd, and a failed growth leaves the segment
    as it was (file size, current_size, extent count) and fully usable; lifting the limit, the
    same growth succeeds. (Before: ENOMEM came out raw, and grow-as left the file grown.)"""
    proc = subprocess.run(script("fault_limits.py", mode), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    want = {"create-as": errno.ENOMEM, "grow-fsize": errno.EFBIG, "grow-as": errno.ENOMEM}[mode]
    assert (res["error"], res["errno"]) == ("InsufficientSharedMemory", want), res
    assert res["fds_leaked"] == 0, res
    if mode != "create-as":
        assert res["file_size_unchanged"] and res["current_size_unchanged"], res
        assert res["extents_after_failure"] == 1 and res["old_pool_usable"], res
        assert res["grown_after_lift"] and res["extents_after_lift"] == 2, res


# -- growth ----------------------------------------------------------------------------------


def test_guest_growth_on_full_tmpfs_waits_then_completes(tmp_path):
    """A walk-in guest exhausts a growable class on a full 1 MiB tmpfs: the host's growth fails
    (one growth_failed event, ENOSPC, no half-grown file), the guest's send waits -- it is not
    failed, nothing it sent before is lost -- and once space is freed the host's retry grows the
    class and the send completes; the host receives every message, in order. (Before: the failed
    request was never retried, so the send timed out.)"""
    with small_tmpfs(str(tmp_path / "mnt")) as mnt:
        host = Host(GROWABLE, path=os.path.join(mnt, "seg"))
        filler = link = None
        try:
            seg = host.segment
            size0 = seg.file_size
            filler = fill(mnt)
            link = shmhub.Guest.attach(seg.path)
            h = wait_until(lambda: next(iter(host.guests), None), TIMEOUT, "walk-in seen")
            msgs = [bytes([i]) * 3000 for i in range(40)]  # slot tier: 40 slots, the class has 16
            errors: list = []

            def send_all():
                try:
                    for m in msgs:
                        link.send(m, timeout=TIMEOUT)
                except BaseException as e:
                    errors.append(e)

            t = threading.Thread(target=send_all)
            t.start()
            ev = events(host, "growth_failed")
            assert "No space" in ev.reason or "free" in ev.reason, ev
            assert seg.file_size == size0 and seg.extent_count(0) == 1
            time.sleep(2 * 0.5)  # two retry periods: still failing, reported again at most twice
            assert t.is_alive() and not errors
            os.unlink(filler)
            filler = None
            wait_until(lambda: seg.extent_count(0) > 1, TIMEOUT, "growth retried once space is back")  # we read nothing yet
            got = [h.link.recv_bytes(timeout=TIMEOUT) for _ in msgs]
            t.join(TIMEOUT)
            assert not t.is_alive() and not errors, errors
            assert got == msgs
            failed = host.stats()["events"].get("growth_failed", 0)
            assert 1 <= failed <= 4, failed  # retried on a period, not on every scan
        finally:
            if link is not None:
                link.close()
            host.close()
            if filler is not None:
                os.unlink(filler)


def test_host_growth_enomem_is_typed_and_segment_stays_usable(monkeypatch, shm_path):
    """The host's own send needs a growth and the extent's mmap fails (ENOMEM): the send raises
    InsufficientSharedMemory at once, the file is not grown, and what was sent before still
    arrives; once memory is back the next send grows the class and everything arrives in order.
    (Before: a raw OSError, and the file was left grown.)"""
    with Host(GROWABLE, path=shm_path) as host:
        link = shmhub.Guest.attach(shm_path)  # a walk-in in this process: it reads when we say
        try:
            h = wait_until(lambda: next(iter(host.guests), None), TIMEOUT, "walk-in seen")
            seg = host.segment
            size0 = seg.file_size
            monkeypatch.setattr(segment_mod, "Region", _Enomem(segment_mod.Region, range(1, 100)))
            sent = []
            with pytest.raises(InsufficientSharedMemory) as ei:
                for i in range(64):  # until the class is exhausted and a growth is needed
                    h.link.send(bytes([i]) * 3000, timeout=TIMEOUT)
                    sent.append(bytes([i]) * 3000)
            assert ei.value.errno == errno.ENOMEM
            assert 0 < len(sent) <= 16, len(sent)
            assert seg.file_size == size0 and seg.extent_count(0) == 1
            monkeypatch.undo()
            h.link.send(b"y" * 3000, timeout=TIMEOUT)
            assert seg.extent_count(0) == 2
            got = [link.recv_bytes(timeout=TIMEOUT) for _ in range(len(sent) + 1)]
            assert got == sent + [b"y" * 3000]
        finally:
            link.close()


# -- EMFILE: the mmap tier -------------------------------------------------------------------


def test_mmap_attach_receiver_out_of_fds():
    """A guest at RLIMIT_NOFILE receives an mmap-tier payload: the kernel drops the mapping's fd
    on arrival, and the guest gets LinkExhausted (a LinkCorrupted and a ResourceExhausted, errno
    EMFILE) instead of a "malformed attach" -- messages before it arrived; the host's send
    succeeded, it recovers the guest when it leaves, and another guest keeps working."""
    with Host(MMAP_CFG) as host:
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fault-mmap-{os.getpid()}.json")
        bystander = host.spawn(script("echo.py", "--copy"))
        g = host.spawn(script("fault_guest.py", "mmap-rx", out))
        try:
            assert g.link.recv_bytes(timeout=TIMEOUT) == b"armed"
            for n in (10, 500, 900):
                g.link.send(b"s" * n, timeout=TIMEOUT)
            assert g.link.recv_bytes(timeout=TIMEOUT) == b"ready"
            g.link.send(b"m" * (1 << 16), timeout=TIMEOUT)  # above the largest slot: the mmap tier
            res = read_report(out, g.process)
            assert (res["error"], res["errno"]) == ("LinkExhausted", errno.EMFILE), res
            assert "file descriptors" in res["message"], res
            assert res["received_before"] == [10, 500, 900], res
            assert g.wait(TIMEOUT) == 0
            events(host, "exited", g.peer_id)
            assert host.segment.peers.state(g.peer_id) == L.PEER_EMPTY
            big = b"b" * (1 << 16)
            bystander.link.send(big, timeout=TIMEOUT)
            assert bystander.link.recv_bytes(timeout=TIMEOUT) == big
        finally:
            for x in (g, bystander):
                x.kill()
                x.wait(TIMEOUT)
            if os.path.exists(out):
                os.unlink(out)


def test_mmap_sender_out_of_fds_is_typed_and_link_survives():
    """The host at RLIMIT_NOFILE sends an mmap-tier payload: memfd_create fails, the send raises
    ResourceExhausted(EMFILE) with nothing sent or held; with fds back the same link carries it.
    (Before: a raw OSError.)"""
    with Host(MMAP_CFG) as host:
        g = host.spawn(script("echo.py", "--copy"))
        try:
            g.link.send(b"before", timeout=TIMEOUT)
            assert g.link.recv_bytes(timeout=TIMEOUT) == b"before"
            big = bytes(range(256)) * 256
            with free_fds(0):
                with pytest.raises(ResourceExhausted) as ei:
                    g.link.send(big, timeout=TIMEOUT)
            assert ei.value.errno == errno.EMFILE
            assert g.link.alive
            g.link.send(big, timeout=TIMEOUT)
            assert g.link.recv_bytes(timeout=TIMEOUT) == big
        finally:
            g.kill()
            g.wait(TIMEOUT)


# -- EMFILE: the bootstrap -------------------------------------------------------------------


def test_bootstrap_guest_out_of_fds(tmp_path):
    """A walk-in guest connects with one fd to spare (its socket's): the 4 fds of the response are
    dropped by the kernel. The guest gets BootstrapExhausted (EMFILE), holds no stray fd, and
    connects fine once its limit is lifted. The host registered the first peer and recovers it
    at once (its doorbell hangs up): the peer is Empty again, no half-registered guest."""
    sock, out = str(tmp_path / "hub.sock"), str(tmp_path / "guest.json")
    with Host(MMAP_CFG) as host:
        host.listen(sock)
        proc = subprocess.Popen(script("fault_guest.py", "bootstrap", out, sock))
        try:
            seen: list = []  # the second attach may come before the first's recovery
            first = events(host, "attached", seen=seen)
            ev = events(host, "died", first.peer_id, seen=seen)
            assert "hang-up" in ev.reason, ev
            second = next((e for e in seen if e.kind == "attached"), None) or events(host, "attached")
            h2 = wait_until(lambda: next((x for x in host.guests if x.peer_id == second.peer_id), None), TIMEOUT, "second guest")
            h2.link.send(b"echo me", timeout=TIMEOUT)
            assert h2.link.recv_bytes(timeout=TIMEOUT) == b"echo me"
            res = read_report(out, proc)
            assert proc.wait(TIMEOUT) == 0
            assert (res["first"]["error"], res["first"]["errno"]) == ("BootstrapExhausted", errno.EMFILE), res
            assert res["fds_end"] == res["fds_before"], res  # the second link's fds were all closed
            events(host, "exited", h2.peer_id)
            assert all(host.segment.peers.state(p) == L.PEER_EMPTY for p in (1, 2))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)


def test_bootstrap_host_out_of_fds(tmp_path):
    """The host at RLIMIT_NOFILE with one fd to spare: it accepts the connection but cannot make
    the guest's doorbell; the guest gets BootstrapRefused naming EMFILE, the reservation is
    released, and with fds back the next guest is served."""
    sock = str(tmp_path / "hub.sock")
    outs = [str(tmp_path / f"g{i}.json") for i in range(2)]
    with Host(MMAP_CFG) as host:
        host.listen(sock)
        proc = subprocess.Popen(script("fault_guest.py", "connect", outs[0], sock, "--wait"), stdin=subprocess.PIPE)
        try:
            with free_fds(1):  # reading the report needs an fd: only its existence is checked here
                os.write(proc.stdin.fileno(), b"go\n")
                wait_until(lambda: os.path.exists(outs[0]) or proc.poll() is not None, TIMEOUT, "first guest's report")
            res = read_report(outs[0], proc)
        finally:
            proc.stdin.close()
            proc.wait(TIMEOUT)
        assert res["error"] == "BootstrapRefused" and "Too many open files" in res["message"], res
        assert host.segment.peers.state(1) == L.PEER_EMPTY and not host._spawning
        proc = subprocess.Popen(script("fault_guest.py", "connect", outs[1], sock))
        try:
            h = wait_until(lambda: next(iter(host.guests), None), TIMEOUT, "second guest")
            h.link.send(b"ok", timeout=TIMEOUT)
            assert h.link.recv_bytes(timeout=TIMEOUT) == b"ok"
            assert read_report(outs[1], proc) == {"error": None}
        finally:
            proc.wait(TIMEOUT)


# -- a SIGSTOPped walk-in guest --------------------------------------------------------------


@pytest.mark.parametrize("killable", [True, False], ids=["pidfd", "no-pidfd"])
def test_sigstopped_walkin_guest_is_stopped_or_recovered_and_sees_an_error_on_sigcont(tmp_path, monkeypatch, killable):
    """A bootstrapped guest is SIGSTOPped with heartbeats on: the host declares it stale within the
    heartbeat timeout, kills it through the pidfd it took from SO_PEERCRED at the bootstrap
    (DECISIONS 14: resumed, it could write into the rings of its entry's next owner), and recovers
    it, while a second guest keeps working.

    Without a pidfd (no-pidfd: pidfd_open unavailable) the host can only recover it. SIGCONT: the
    stopped guest's blocked recv fails with HostGone (its doorbell hung up; before: LinkCorrupted
    from its reset ring, or a goodbye written over the entry's next owner), a later send fails
    too, and its close() leaves the entry alone."""
    if not killable:
        monkeypatch.setattr(shmhub.host, "_peer_pidfd", lambda conn: (0, None))
    interval = 500_000_000  # stale after 1 s: the working guest must never look stale on a loaded machine
    cfg = SegmentConfig(max_guests=2, bipbuf_capacity=8192, heartbeat_interval_ns=interval, size_classes=((1024, 16),))
    sock = str(tmp_path / "hub.sock")
    outs = [str(tmp_path / f"g{i}.json") for i in range(2)]
    with Host(cfg) as host:
        host.listen(sock)
        other = subprocess.Popen(script("fault_guest.py", "stop", outs[1], sock))
        old = None
        try:
            b = wait_until(lambda: next(iter(host.guests), None), TIMEOUT, "other guest attached")
            assert b.link.recv_bytes(timeout=TIMEOUT) == b"ready"
            old = subprocess.Popen(script("fault_guest.py", "stop", outs[0], sock))
            h = wait_until(lambda: next((x for x in host.guests if x is not b), None), TIMEOUT, "stopped guest attached")
            assert h.link.recv_bytes(timeout=TIMEOUT) == b"ready"
            for i in range(3):  # both links carry traffic (frames pass through every ring position)
                for x in (h, b):
                    x.link.send(b"ping%d" % i, timeout=TIMEOUT)
                    assert x.link.recv_bytes(timeout=TIMEOUT) == b"ping%d" % i
            old.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            ev = events(host, "died", h.peer_id, timeout=10)
            assert "heartbeat" in ev.reason, ev
            assert time.monotonic() - t0 < 10 * interval / 1e9 + 5  # a bound, not a timing claim
            assert host.segment.peers.state(h.peer_id) == L.PEER_EMPTY
            for i in range(20):  # the other guest never noticed
                b.link.send(b"b%d" % i, timeout=TIMEOUT)
                assert b.link.recv_bytes(timeout=TIMEOUT) == b"b%d" % i
            if killable:
                assert old.wait(TIMEOUT) == -signal.SIGKILL
                assert h.pid == old.pid and ev.pid == old.pid
                return
            old.send_signal(signal.SIGCONT)
            res = read_report(outs[0], old)
            assert old.wait(TIMEOUT) == 0
            assert res["echoed"] == 3, res
            assert res["recv"]["error"] == "HostGone", res
            assert res["send"]["error"] == "HostGone", res
            assert host.segment.peers.state(h.peer_id) == L.PEER_EMPTY  # its close() wrote no goodbye
            for i in range(20):
                b.link.send(b"c%d" % i, timeout=TIMEOUT)
                assert b.link.recv_bytes(timeout=TIMEOUT) == b"c%d" % i
            assert b.link.try_recv() is None and b.alive
        finally:
            for p in (old, other):
                if p is not None:
                    if p.poll() is None:
                        p.send_signal(signal.SIGCONT)
                        p.kill()
                    p.wait(TIMEOUT)


# -- a host SIGKILLed while guests are mid-send ----------------------------------------------


def test_host_sigkill_with_guests_mid_send(tmp_path, shm_path):
    """SIGKILL a host whose guests are mid-send: one blocked on a full ring, one in a tight send
    loop. Each gets HostGone/PeerDead (doorbell hang-up) and exits 0. The named segment file stays
    (a killed host cannot unlink it); `shmhub clean --yes` finds it stale and removes it."""
    outdir = str(tmp_path)
    host = subprocess.Popen(script("fault_host.py", outdir, shm_path))
    pidfds: dict = {}
    try:
        info = read_report(os.path.join(outdir, "host.json"), host)
        for pid in info["guests"]:
            pidfds[pid] = os.pidfd_open(pid)
        t_kill = time.monotonic_ns()
        host.kill()
        assert host.wait(TIMEOUT) == -signal.SIGKILL
        for name in ("blocked.json", "loop.json"):
            res = read_report(os.path.join(outdir, name))
            assert res["error"] in ("HostGone", "PeerDead"), res
            assert res["noticed_ns"] > t_kill and res["sent"] > 0, res
        for fd in pidfds.values():  # both exit by themselves (reparented: not ours to reap)
            wait_until(lambda fd=fd: select_readable(fd), TIMEOUT, "guest exit")
        assert os.path.exists(shm_path)
        clean = subprocess.run([sys.executable, "-m", "shmhub", "clean", "--yes", shm_path], capture_output=True, text=True, timeout=TIMEOUT)
        assert clean.returncode == 0, clean.stderr
        assert not os.path.exists(shm_path), clean.stdout
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(TIMEOUT)
        for fd in pidfds.values():
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.close(fd)


def select_readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])
