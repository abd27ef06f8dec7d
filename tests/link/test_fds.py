"""fd hygiene of Host.spawn and crash recovery (DECISIONS 12, trap 33).

* 50 guests spawned and SIGKILLed in a row: the host's fd table returns to its baseline after each.
* Several live guests: each holds exactly two sockets -- the peers of its own host-side doorbell and
  mmap control socket -- and otherwise only stdio and the segment; no guest holds another's doorbell
  or any host fd.
* What a child inherits at exec: stdio, the segment, its doorbell and control socket, nothing else (not even an
  inheritable fd the host process had open).
Socket peers come from the kernel (NETLINK_SOCK_DIAG, UDIAG_SHOW_PEER), fds from /proc/<pid>/fd.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

from shmhub import Host, SegmentConfig

GUESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "guests")
PROBE = os.path.join(GUESTS, "crash_fdprobe.py")
CONFIG = SegmentConfig(max_guests=4, bipbuf_capacity=16 * 1024, size_classes=((1024, 16), (16 * 1024, 8)))
TIMEOUT = 10.0


def fd_table(pid="self") -> dict:
    """{fd: readlink target} of a process (the listing's own fd excluded). A link's close wake-up
    eventfd (made the first time a thread sleeps on it, closed with the link) is private to the
    process and never inherited, so it is left out: what is counted here is what crosses processes."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target != "anon_inode:[eventfd]":
            out[int(fd)] = target
    return out


def socket_inode(target: str) -> int:
    assert target.startswith("socket:["), target
    return int(target[len("socket:[") : -1])


def unix_peers() -> dict:
    """{inode: peer inode} of every connected Unix socket on the machine (sock_diag netlink)."""
    NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, UDIAG_SHOW_PEER, UNIX_DIAG_PEER = 4, 20, 0x4, 2
    NLMSG_ERROR, NLMSG_DONE, NLM_F_REQUEST_DUMP = 2, 3, 0x301
    req = struct.pack("<BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
    peers = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(TIMEOUT)
        nl.send(struct.pack("<IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST_DUMP, 1, 0) + req)
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("<IH", data, off)
                if kind == NLMSG_DONE:
                    return peers
                if kind == NLMSG_ERROR:
                    raise OSError(-struct.unpack_from("<i", data, off + 16)[0], "sock_diag dump failed")
                ino = struct.unpack_from("<I", data, off + 20)[0]
                p = off + 32
                while p + 4 <= off + length:
                    alen, atype = struct.unpack_from("<HH", data, p)
                    if atype == UNIX_DIAG_PEER:
                        peers[ino] = struct.unpack_from("<I", data, p + 4)[0]
                    p += (max(alen, 4) + 3) & ~3
                off += (length + 3) & ~3


def host_bell_inode(h) -> int:
    return os.fstat(h.link.doorbell.fileno()).st_ino


def host_ctrl_inode(h) -> int:
    return os.fstat(h.link._control.fileno()).st_ino


def own_sockets(h, peers: dict) -> list:
    """The guest ends of this guest's doorbell and mmap control socket."""
    return sorted([peers[host_bell_inode(h)], peers[host_ctrl_inode(h)]])


def check_report(h, host: Host, report: dict, peers: dict) -> None:
    """The probe's own view: what it inherited, and what it holds once connected."""
    env = report["env"]
    assert report["pid"] == h.pid and env["peer_id"] == h.peer_id
    seg_fd, bell_fd, ctrl_fd = str(env["segment_fd"]), str(env["doorbell_fd"]), str(env["control_fd"])
    own_bell, own_ctrl = peers[host_bell_inode(h)], peers[host_ctrl_inode(h)]
    stdio = {str(fd): t for fd, t in fd_table().items() if fd <= 2}
    seg_target = os.readlink(f"/proc/self/fd/{host.segment.fd}")
    inherited = report["at_start"]
    assert inherited == {**stdio, seg_fd: seg_target, bell_fd: f"socket:[{own_bell}]", ctrl_fd: f"socket:[{own_ctrl}]"}, (
        f"guest {h.peer_id} inherited {inherited}; expected stdio, the segment ({seg_fd}), its doorbell ({bell_fd}) and control socket ({ctrl_fd})"
    )
    held = report["connected"]
    sockets = [t for t in held.values() if t.startswith("socket:")]
    assert sorted(sockets) == sorted([f"socket:[{own_bell}]", f"socket:[{own_ctrl}]"]), f"guest {h.peer_id} holds sockets {sockets}"
    others = {fd: t for fd, t in held.items() if fd not in stdio and not t.startswith("socket:")}
    assert list(others.values()) == [seg_target], f"guest {h.peer_id} holds {others} besides stdio and its doorbell"


def first_report(h) -> dict:
    with h.link.recv(timeout=TIMEOUT) as msg:
        return json.loads(msg.tobytes())


def next_event(host: Host):
    ev = host.events.get(timeout=TIMEOUT)
    assert ev.kind != "recovery_failed", ev
    return ev


def test_spawn_and_kill_50_guests_fd_baseline():
    """Spawn and SIGKILL 50 guests one after the other -- half after they connected and reported
    their fds, half right after exec -- and the host's fd table is back to its baseline every time."""
    latencies = []
    with Host(CONFIG) as host:
        baseline = fd_table()
        for i in range(50):
            h = host.spawn([sys.executable, PROBE])
            assert next_event(host).kind == "spawned"
            assert len(fd_table()) == len(baseline) + 3  # the host's doorbell and control ends, and the pidfd
            if i % 2 == 0:
                check_report(h, host, first_report(h), unix_peers())
            t_kill = time.monotonic_ns()
            os.kill(h.pid, signal.SIGKILL)
            ev = next_event(host)
            assert (ev.kind, ev.pid) == ("died", h.pid), ev
            latencies.append(ev.time_ns - t_kill)
            assert h.wait(TIMEOUT) == -signal.SIGKILL
            assert fd_table() == baseline, f"after guest {i}: fds {fd_table()} != baseline {baseline}"
        assert host.guests == []
    lat = sorted(latencies)
    print(f"50 spawn/kill cycles: death noticed median {lat[25] / 1e6:.2f} ms, max {lat[-1] / 1e6:.2f} ms")


def test_live_guests_hold_only_their_own_fds():
    """Four guests live at once (the host holding an inheritable pipe meanwhile): each inherited
    exactly stdio + segment + its own doorbell, and /proc/<pid>/fd shows each holding one socket,
    the peer of its own host-side doorbell. Killing one leaves the others' fds untouched and is
    noticed; the rest leave when the host closes."""
    r, w = os.pipe()
    os.set_inheritable(r, True)  # close_fds must keep this out of every child
    os.set_inheritable(w, True)
    try:
        with Host(CONFIG) as host:
            baseline = fd_table()
            handles = [host.spawn([sys.executable, PROBE]) for _ in range(CONFIG.max_guests)]
            assert sorted(h.peer_id for h in handles) == list(range(1, CONFIG.max_guests + 1))
            reports = [first_report(h) for h in handles]  # all connected now
            assert len(fd_table()) == len(baseline) + 3 * len(handles)
            peers = unix_peers()
            for h, rep in zip(handles, reports):
                check_report(h, host, rep, peers)

            host_fds = fd_table()
            host_bells = {host_bell_inode(h) for h in handles}
            seg_ino = os.fstat(host.segment.fd).st_ino
            private = {os.stat(f"/proc/self/fd/{fd}").st_ino for fd in host_fds if fd > 2} - {seg_ino}
            guest_sockets = {}
            for h in handles:
                table = fd_table(h.pid)
                sockets = [socket_inode(t) for t in table.values() if t.startswith("socket:")]
                assert sorted(sockets) == own_sockets(h, peers), (
                    f"guest {h.peer_id} (pid {h.pid}) holds sockets {sockets}, not the peers of its own doorbell and control socket: {table}"
                )
                assert not set(sockets) & host_bells
                guest_sockets[h.peer_id] = tuple(sorted(sockets))
                inodes = [os.stat(f"/proc/{h.pid}/fd/{fd}").st_ino for fd in table if fd > 2]
                assert sorted(inodes) == sorted([seg_ino, *sockets]), f"guest {h.peer_id} holds {table}"
                assert not set(inodes) & private, f"guest {h.peer_id} holds host-private fds: {table} vs {host_fds}"
                assert {fd: t for fd, t in table.items() if fd <= 2} == {fd: t for fd, t in host_fds.items() if fd <= 2}
            assert len(set(guest_sockets.values())) == len(handles)

            victim = handles[1]
            os.kill(victim.pid, signal.SIGKILL)
            ev = next_event(host)
            while ev.kind == "spawned":
                ev = next_event(host)
            assert (ev.kind, ev.peer_id) == ("died", victim.peer_id), ev
            assert victim.wait(TIMEOUT) == -signal.SIGKILL
            assert len(fd_table()) == len(baseline) + 3 * (len(handles) - 1)
            for h in handles:
                if h is not victim:
                    assert h.alive and h.process.poll() is None
                    assert tuple(sorted(socket_inode(t) for t in fd_table(h.pid).values() if t.startswith("socket:"))) == guest_sockets[h.peer_id]
            survivors = [h for h in handles if h is not victim]
        for h in survivors:  # host.close() said goodbye: they saw HostGone and left on their own
            assert h.wait(TIMEOUT) == 0
    finally:
        os.close(r)
        os.close(w)
