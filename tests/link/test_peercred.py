"""Peer credentials (issue 17): the bootstrap listener admits only its own euid unless told otherwise
(SO_PEERCRED), and a named segment owned by another uid is refused on attach unless allowed.

The suite runs as root; "another user" is a forked child that drops to uid/gid 65534 (nobody) or
another pair before it connects. It forks rather than execs because the interpreter lies under
/root (0700), which nobody cannot reach; the child only uses modules already imported, and leaves
with os._exit.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
from typing import Callable, Optional

import pytest

import shmhub
from shmhub import bootstrap
from shmhub.errors import CredentialsRefused, ForeignSegment, PeerCredentialsRefused, SegmentError
from shmhub.segment import Segment

from linkutil import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")

NOBODY = 65534
CONFIG = shmhub.SegmentConfig(max_guests=4)


def guest(path: str) -> dict:
    """The walk-in guest, run as another user: what connect() did."""
    out = {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}
    try:
        link = shmhub.connect(path, timeout=10)
    except Exception as e:
        out.update(error=type(e).__name__, message=str(e), permission=isinstance(e, PermissionError), refused=isinstance(e, shmhub.BootstrapRefused))
    else:
        link.send(b"from another user", timeout=10)
        out["reply"] = link.recv_bytes(timeout=10).decode()
        link.close()
    return out


class Child:
    """fn() in a forked child running as uid/gid; result() is its return value (a JSON dict)."""

    def __init__(self, fn: Callable[[], dict], uid: int = NOBODY, gid: int = NOBODY) -> None:
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                out = fn()
                code = 0
            except BaseException as e:
                out = {"crash": repr(e)}
            finally:
                try:
                    os.write(w, json.dumps(out).encode())
                finally:
                    os._exit(code)
        os.close(w)
        self._r: Optional[int] = r

    def result(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._r], [], [], left)[0]:
                    raise AssertionError(f"child {self.pid} gave no result within {timeout} s")
                chunk = os.read(self._r, 65536)
                if not chunk:
                    break
                data += chunk
        finally:
            self.close()
        return json.loads(data)

    def close(self) -> None:
        if self._r is None:
            return
        os.close(self._r)
        self._r = None
        if os.waitpid(self.pid, os.WNOHANG) == (0, 0):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


@pytest.fixture
def sock_dir():
    """A directory another user can traverse (0711) but not list or write; pytest's tmp_path lies
    under a 0700 directory, so the child could not reach a socket there."""
    d = tempfile.mkdtemp(prefix="shmhub-peercred-")
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d)


def peer_states(host) -> list:
    return [host.segment.peers.state_name(p) for p in range(1, CONFIG.max_guests + 1)]


def serve_echo(host) -> None:
    """Host side of guest()'s success path: receive, reply reversed, see it leave."""
    h, msg = host.recv_any(timeout=20)
    with msg:
        data = msg.tobytes()
    h.link.send(data[::-1], timeout=10)


# -- the bootstrap listener ---------------------------------------------------------------------


def test_another_uid_is_refused_by_default(sock_dir, caplog):
    """Default policy: only the host's euid. The socket's 0600 mode alone would stop a non-root
    connect() with EACCES before SO_PEERCRED is ever read, so the test widens it to 0666, as a
    loosened mode or a root peer would, to reach the credentials check itself."""
    caplog.set_level(logging.WARNING, logger="shmhub")
    path = os.path.join(sock_dir, "hub.sock")
    with shmhub.Host(CONFIG) as host:
        host.listen(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.chmod(path, 0o666)
        out = Child(lambda: guest(path)).result()
        assert out["error"] == "PeerCredentialsRefused", out
        assert out["permission"] and out["refused"]
        assert f"{bootstrap.CREDENTIALS_REFUSED}: uid {NOBODY} (gid {NOBODY}) is not allowed" in out["message"]
        lis = host._listener
        wait_until(lambda: lis.idle, what="the listener to close the refused connection")
        assert (lis.accepted, lis.refused, lis.served, lis.pending) == (1, 1, 0, 0)
        assert peer_states(host) == ["Empty"] * 4  # nothing reserved, nothing leaked
        records = [r for r in caplog.records if r.name == "shmhub" and r.levelno == logging.WARNING]
        assert len(records) == 1, [r.getMessage() for r in caplog.records]
        text = records[0].getMessage()
        assert f"refused pid {out['pid']} uid {NOBODY} gid {NOBODY}" in text and path in text
        # The host's own uid is still served after the refusal.
        link = shmhub.connect(path, timeout=10)
        link.send(b"root", timeout=10)
        serve_echo(host)
        assert link.recv_bytes(timeout=10) == b"toor"
        link.close()


@pytest.mark.parametrize(
    "options, uid, gid",
    [
        ({"allow_uids": [NOBODY]}, NOBODY, NOBODY),
        ({"allow_gids": [NOBODY]}, 4242, NOBODY),  # admitted by its gid alone
    ],
    ids=["allow_uids", "allow_gids"],
)
def test_allow_list_admits_the_other_user(sock_dir, caplog, options, uid, gid):
    """An allow-list naming another user makes the socket 0666 (the mode can no longer be the gate,
    SO_PEERCRED is), and that user bootstraps and exchanges messages like any guest."""
    caplog.set_level(logging.WARNING, logger="shmhub")
    path = os.path.join(sock_dir, "hub.sock")
    with shmhub.Host(CONFIG) as host:
        host.listen(path, **options)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        child = Child(lambda: guest(path), uid, gid)
        try:
            serve_echo(host)
        finally:
            out = child.result()
        assert out == {"uid": uid, "gid": gid, "pid": child.pid, "reply": "resu rehtona morf"}
        assert host._listener.refused == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "refused" in r.getMessage()]


def test_allow_list_refuses_users_outside_it(sock_dir):
    path = os.path.join(sock_dir, "hub.sock")
    with shmhub.Host(CONFIG) as host:
        host.listen(path, allow_gids=[NOBODY])
        out = Child(lambda: guest(path), 4242, 4242).result()
        assert out["error"] == "PeerCredentialsRefused" and "uid 4242 (gid 4242)" in out["message"]
        wait_until(lambda: host._listener.idle, what="the listener to close the refused connection")
        assert peer_states(host) == ["Empty"] * 4


def test_refusal_reaches_a_guest_that_sends_after_the_host_closed(sock_dir, monkeypatch):
    """The refusal is sent at accept, before the request: a guest whose VSH1 goes out after the host
    has already closed (EPIPE) still reads the diagnostic. Credentials faked in-process to order it."""
    monkeypatch.setattr(bootstrap, "peer_credentials", lambda conn: bootstrap.PeerCred(1, 4242, 4242))
    path = os.path.join(sock_dir, "hub.sock")
    with shmhub.Host(CONFIG) as host:
        host.listen(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(path)
            wait_until(lambda: host._listener.refused == 1 and host._listener.idle, what="the refusal")
            resp = bootstrap.exchange(s, timeout=5)
        assert not resp.ok and resp.payload.startswith(bootstrap.CREDENTIALS_REFUSED) and "uid 4242" in resp.payload
        assert peer_states(host) == ["Empty"] * 4


def test_unreadable_credentials_are_refused(sock_dir, monkeypatch, caplog):
    def fail(conn):
        raise OSError(95, "Operation not supported")

    caplog.set_level(logging.WARNING, logger="shmhub")
    monkeypatch.setattr(bootstrap, "peer_credentials", fail)
    path = os.path.join(sock_dir, "hub.sock")
    with shmhub.Host(CONFIG) as host:
        host.listen(path)
        with pytest.raises(PeerCredentialsRefused, match="cannot read them"):
            shmhub.connect(path, timeout=5)
        wait_until(lambda: host._listener.idle, what="the listener to close the refused connection")
    assert any("cannot read the peer's credentials" in r.getMessage() for r in caplog.records)


def test_listener_options(sock_dir):
    """Socket mode per policy, and bad allow-lists are refused before anything is bound."""
    path = os.path.join(sock_dir, "hub.sock")
    for options, mode in [({}, 0o600), ({"allow_uids": [0, os.geteuid()]}, 0o600), ({"allow_uids": (1000,)}, 0o666), ({"allow_gids": {5}}, 0o666)]:
        lis = bootstrap.Listener(path, lambda conn: None, **options)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == mode, options
            assert os.geteuid() in lis.allow_uids
        finally:
            lis.close()
    for bad, error in [("1000", TypeError), (1000, TypeError), ([-1], ValueError), (["0"], ValueError), ([True], ValueError)]:
        with pytest.raises(error, match="allow_uids"):
            bootstrap.Listener(path, lambda conn: None, allow_uids=bad)
        assert not os.path.exists(path)
    with shmhub.Host(CONFIG) as host:
        with pytest.raises(TypeError, match="Unix socket"):
            host.listen("tcp://127.0.0.1:0", allow_uids=[1000])


def test_peer_credentials_of_a_socketpair():
    a, b = socket.socketpair()
    with a, b:
        assert bootstrap.peer_credentials(a) == (os.getpid(), os.geteuid(), os.getegid())


# -- named segments -----------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_named_segment_is_created_0600_whatever_the_umask(shm_path, umask):
    old = os.umask(umask)
    try:
        seg = Segment.create(CONFIG, shm_path)
    finally:
        os.umask(old)
    with seg:
        st = os.stat(shm_path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        seg.unlink()


def test_foreign_segment_is_refused_unless_allowed(shm_path):
    with shmhub.Host(CONFIG, path=shm_path) as host:
        os.chown(shm_path, NOBODY, NOBODY)
        baseline = fd_count()
        with pytest.raises(ForeignSegment, match=f"owned by uid {NOBODY}.*allow_uids=\\({NOBODY},\\)") as info:
            Segment.attach(shm_path)
        assert isinstance(info.value, PermissionError) and isinstance(info.value, CredentialsRefused)
        assert isinstance(info.value, SegmentError)
        with pytest.raises(ForeignSegment):
            shmhub.Guest.attach(shm_path)
        with pytest.raises(ForeignSegment):
            Segment.attach(shm_path, allow_uids=[1000])  # an allow-list, but not this owner
        assert fd_count() == baseline  # the opened fd was closed on refusal
        assert peer_states(host) == ["Empty"] * 4
        # Explicitly allowed: a working guest.
        link = shmhub.Guest.attach(shm_path, allow_uids=[NOBODY])
        link.send(b"walk-in", timeout=10)
        serve_echo(host)
        assert link.recv_bytes(timeout=10) == b"ni-klaw"
        link.close()
        # Read-only inspection is not an attach as a peer: no owner check.
        with Segment.attach(shm_path, writable=False) as ro:
            assert ro.config.max_guests == 4


def test_world_writable_segment_is_refused(shm_path):
    with shmhub.Host(CONFIG, path=shm_path):
        os.chmod(shm_path, 0o606)
        with pytest.raises(ForeignSegment, match="writable by every user.*0606"):
            Segment.attach(shm_path, allow_uids=[NOBODY])
        os.chmod(shm_path, 0o660)  # group access is the owner's choice: allowed
        with Segment.attach(shm_path) as seg:
            assert seg.config.max_guests == 4
        with pytest.raises(TypeError, match="allow_uids"):
            Segment.attach(shm_path, allow_uids=NOBODY)


def test_fd_attach_is_not_checked(shm_path):
    """The bootstrap hands the segment's fd over: its sender is the host we chose to connect to."""
    with shmhub.Host(CONFIG, path=shm_path) as host:
        os.chown(shm_path, NOBODY, NOBODY)
        with Segment.attach(host.segment.fd) as seg:
            assert seg.config.max_guests == 4
