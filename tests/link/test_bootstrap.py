"""Socket bootstrap of walk-in guests (format-v7 1.11, DECISIONS 17, traps 30, 35-37, 40).

Wire: encode/decode round trips and every malformed form, fds closed whenever a frame is refused.
Host.listen: 20 guest processes at once (inline, slot and mmap payloads verified both ways), death by
doorbell hang-up, malformed and silent peers answered or dropped without leaking fds or peer entries.
"""

from __future__ import annotations

import array
import collections
import importlib.util
import json
import os
import queue
import select
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

import shmhub
from shmhub import bootstrap
from shmhub import layout as L
from shmhub.errors import BootstrapError, BootstrapRefused, ShmTimeout

HERE = os.path.dirname(os.path.abspath(__file__))
GUEST = os.path.join(HERE, "_bootstrap_guest.py")
_spec = importlib.util.spec_from_file_location("_bootstrap_guest", GUEST)
guest_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guest_mod)

# Largest slot payload is 64 KiB - 4: SLOT_SIZE goes through a slot, MMAP_SIZE through the mmap tier.
CONFIG = shmhub.SegmentConfig(max_guests=24, bipbuf_capacity=64 * 1024, size_classes=((1024, 64), (16 * 1024, 32), (64 * 1024, 48)))
INLINE_SIZE, SLOT_SIZE, MMAP_SIZE = 100, 40_000, 300_000
assert INLINE_SIZE <= CONFIG.effective_inline_threshold < SLOT_SIZE <= CONFIG.max_slot_payload < MMAP_SIZE
OK, ERR = L.BOOTSTRAP_STATUS_OK, L.BOOTSTRAP_STATUS_ERROR


# -- helpers ----------------------------------------------------------------------------------


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def peer_states(host) -> list:
    return [host.segment.peers.state_name(p) for p in range(1, host.segment.config.max_guests + 1)]


def next_event(host, kind: str, timeout: float = 10.0):
    """The oldest event of this kind; events of other kinds read meanwhile are kept for later calls."""
    kept = host.__dict__.setdefault("_test_kept_events", [])
    for i, ev in enumerate(kept):
        if ev.kind == kind:
            return kept.pop(i)
    deadline = time.monotonic() + timeout
    while True:
        rem = deadline - time.monotonic()
        assert rem > 0, f"no {kind!r} event within {timeout} s (others: {[e.kind for e in kept]})"
        try:
            ev = host.events.get(timeout=rem)
        except queue.Empty:
            continue
        if ev.kind == kind:
            return ev
        kept.append(ev)


def no_events(host) -> bool:
    return host.events.empty() and not host.__dict__.get("_test_kept_events")


def pipe_fds():
    """(r, w) where the write end reports BrokenPipeError once every copy of r is closed."""
    return os.pipe2(os.O_CLOEXEC)


def read_end_closed(w: int) -> bool:
    try:
        os.write(w, b"x")
        return False
    except BrokenPipeError:
        return True


def rights(*fds) -> tuple:
    return (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "hub.sock")


SHORT = 0.5  # request_timeout of the tests that wait for it to expire
LONG = 20.0  # request_timeout elsewhere: a stalled client on a loaded machine must not change the outcome


@pytest.fixture
def host(sock_path, request):
    """A listening host (request_timeout LONG unless parametrized), closed afterwards (socket path removed)."""
    h = shmhub.Host(CONFIG)
    h.listen(sock_path, request_timeout=getattr(request, "param", LONG))
    yield h
    h.close()
    assert not os.path.exists(sock_path)


def echo_once(host, link, data: bytes) -> None:
    """Guest sends data, host checks it and replies reversed, guest checks the reply."""
    link.send(data, timeout=10)
    h, msg = host.recv_any(timeout=10)
    with msg:
        assert msg.tobytes() == data
    assert h.peer_id == link.peer_id and h.process is None and h.link.doorbell is not None
    h.link.send(data[::-1], timeout=10)
    assert link.recv_bytes(timeout=10) == data[::-1]


# -- the wire ---------------------------------------------------------------------------------


class TestWire:
    def test_request(self):
        assert bootstrap.encode_request() == b"VSH1" == L.BOOTSTRAP_REQUEST
        bootstrap.decode_request(b"VSH1")
        assert bootstrap.request_incomplete(b"") and bootstrap.request_incomplete(b"VSH")
        assert not bootstrap.request_incomplete(b"VSX") and not bootstrap.request_incomplete(b"VSH1")

    @pytest.mark.parametrize(
        "data, needle",
        [
            (b"", "short request: 0 of 4"),
            (b"VS", "short request: 2 of 4"),
            (b"VSH2", "bad request magic"),
            (b"vsh1", "bad request magic"),
            (b"\x00\x00\x00\x00", "bad request magic"),
            (b"VSH1\x00", "longer than 4"),
            (b"VSH1VSH1", "longer than 4"),
            (b"RSH0\x02\x00ab", "older RSH0"),
            (b"GET / HTTP/1.1\r\n", "bad request magic"),
        ],
    )
    def test_request_malformed(self, data, needle):
        with pytest.raises(BootstrapError, match=needle):
            bootstrap.decode_request(data)

    def test_response_bytes(self):
        # 0 magic, 4 status, 5 peer_id (u32 LE), 9 payload_len (u16 LE), 11 payload
        assert bootstrap.encode_response(OK, 7, "/dev/shm/x") == b"VSP1\x00\x07\x00\x00\x00\x0a\x00/dev/shm/x"
        assert bootstrap.encode_response(ERR, 0, "no") == b"VSP1\x01\x00\x00\x00\x00\x02\x00no"
        assert bootstrap.encode_response(OK, 255, "") == b"VSP1\x00\xff\x00\x00\x00\x00\x00"

    @pytest.mark.parametrize(
        "status, peer_id, payload",
        [
            (OK, 1, ""),
            (OK, 200, "/dev/shm/hub-ü"),
            (ERR, 0, "peer table full"),
            (ERR, 0, "x" * 65535),
        ],
    )
    def test_response_round_trip(self, status, peer_id, payload):
        frame = bootstrap.encode_response(status, peer_id, payload)
        assert len(frame) == 11 + len(payload.encode())
        fds = [pipe_fds() for _ in range(4)] if status == OK else []
        try:
            resp = bootstrap.decode_response(frame, [rights(*[r for r, _ in fds])] if fds else [], 0)
            assert (resp.status, resp.peer_id, resp.payload) == (status, peer_id, payload)
            assert resp.ok == (status == OK)
            assert resp.fds == tuple(r for r, _ in fds)
        finally:
            for r, w in fds:
                os.close(r)
                os.close(w)

    @pytest.mark.parametrize(
        "args",
        [
            (2, 0, ""),
            (255, 0, ""),
            (ERR, 3, "x"),
            (OK, 0, ""),
            (OK, 256, ""),
            (OK, -1, ""),
            (ERR, 0, "x" * 65536),
            (ERR, 0, b"\xff\xfe"),
        ],
    )
    def test_encode_refuses(self, args):
        with pytest.raises(ValueError):
            bootstrap.encode_response(*args)

    def test_clip_diagnostic(self):
        clipped = bootstrap.clip_diagnostic("é" * 40000)  # 80000 bytes of UTF-8
        assert len(clipped.encode()) <= 65535 and clipped == "é" * (65535 // 2)
        bootstrap.encode_response(ERR, 0, clipped)

    @pytest.mark.parametrize(
        "name, frame, nfds, flags, needle",
        [
            ("empty", b"", 0, 0, "without a response"),
            ("short header", b"VSP1\x00\x01\x00", 0, 0, "truncated: 7 bytes"),
            ("bad magic", b"VSP2\x01\x00\x00\x00\x00\x00\x00", 0, 0, "bad bootstrap response magic"),
            ("old magic", b"RSP0\x00\x01\x00\x00\x00\x00\x00", 4, 0, "bad bootstrap response magic"),
            ("status 2", b"VSP1\x02\x00\x00\x00\x00\x00\x00", 0, 0, "status 2"),
            ("status 255", b"VSP1\xff\x01\x00\x00\x00\x00\x00", 4, 0, "status 255"),
            ("payload short", b"VSP1\x01\x00\x00\x00\x00\x05\x00abc", 0, 0, "announces 11 \\+ 5"),
            ("payload long", b"VSP1\x01\x00\x00\x00\x00\x01\x00abc", 0, 0, "announces 11 \\+ 1"),
            ("trailing on ok", b"VSP1\x00\x01\x00\x00\x00\x00\x00X", 4, 0, "announces 11 \\+ 0"),
            ("not utf-8", b"VSP1\x01\x00\x00\x00\x00\x02\x00\xc3\x28", 0, 0, "not UTF-8"),
            ("error with peer", b"VSP1\x01\x02\x00\x00\x00\x00\x00", 0, 0, "peer_id 2; it must be 0"),
            ("error with fds", b"VSP1\x01\x00\x00\x00\x00\x00\x00", 1, 0, "carries 1 fds; it must carry none"),
            ("ok peer 0", b"VSP1\x00\x00\x00\x00\x00\x00\x00", 4, 0, "peer_id 0"),
            ("ok peer 256", b"VSP1\x00\x00\x01\x00\x00\x00\x00", 4, 0, "peer_id 256"),
            ("ok no fds", b"VSP1\x00\x01\x00\x00\x00\x00\x00", 0, 0, "carries 0 fds"),
            ("ok 3 fds", b"VSP1\x00\x01\x00\x00\x00\x00\x00", 3, 0, "carries 3 fds"),
            ("ok 5 fds", b"VSP1\x00\x01\x00\x00\x00\x00\x00", 5, 0, "carries 5 fds"),
            ("ctrunc", b"VSP1\x00\x01\x00\x00\x00\x00\x00", 4, socket.MSG_CTRUNC, "MSG_CTRUNC"),
            ("trunc", b"VSP1\x00\x01\x00\x00\x00\x00\x00", 4, socket.MSG_TRUNC, "MSG_TRUNC"),
        ],
    )
    def test_decode_refuses_and_closes_fds(self, name, frame, nfds, flags, needle):
        pipes = [pipe_fds() for _ in range(nfds)]
        anc = [rights(*[r for r, _ in pipes])] if pipes else []
        with pytest.raises(BootstrapError, match=needle):
            bootstrap.decode_response(frame, anc, flags)
        for _, w in pipes:
            assert read_end_closed(w), f"{name}: a received fd was left open"
            os.close(w)

    def test_decode_refuses_two_cmsgs_and_foreign_cmsgs(self):
        frame = bootstrap.encode_response(OK, 1, "")
        pipes = [pipe_fds() for _ in range(4)]
        rs = [r for r, _ in pipes]
        with pytest.raises(BootstrapError, match="2 SCM_RIGHTS messages"):
            bootstrap.decode_response(frame, [rights(*rs[:2]), rights(*rs[2:])], 0)
        assert all(read_end_closed(w) for _, w in pipes)
        pipes2 = [pipe_fds() for _ in range(4)]
        creds = (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, bytes(12))
        with pytest.raises(BootstrapError, match="other than SCM_RIGHTS"):
            bootstrap.decode_response(frame, [rights(*[r for r, _ in pipes2]), creds], 0)
        assert all(read_end_closed(w) for _, w in pipes2)
        for _, w in pipes + pipes2:
            os.close(w)

    def test_partial_trailing_int_in_cmsg_is_ignored_then_refused(self):
        r, w = pipe_fds()
        body = array.array("i", [r]).tobytes() + b"\x01\x02"  # a truncated cmsg can end in part of an int
        with pytest.raises(BootstrapError, match="carries 1 fds"):
            bootstrap.decode_response(bootstrap.encode_response(OK, 1, ""), [(socket.SOL_SOCKET, socket.SCM_RIGHTS, body)], 0)
        assert read_end_closed(w)
        os.close(w)

    def test_send_response_validates_fd_count(self):
        a, b = socket.socketpair()
        try:
            with pytest.raises(ValueError):
                bootstrap.send_response(a, OK, 1, "", [a.fileno()] * 3)
            with pytest.raises(ValueError):
                bootstrap.send_response(a, ERR, 0, "no", [a.fileno()])
            b.setblocking(False)
            with pytest.raises(BlockingIOError):
                b.recv(1)  # nothing went out
        finally:
            a.close()
            b.close()

    def test_socket_round_trip_with_four_fds(self):
        a, b = socket.socketpair()
        pipes = [pipe_fds() for _ in range(4)]
        resp = None
        try:
            bootstrap.send_response(a, OK, 9, "/dev/shm/seg", [r for r, _ in pipes])
            for r, _ in pipes:
                os.close(r)  # in flight: the receiver's copies are now the only read ends
            resp = bootstrap.recv_response(b, timeout=5)
            assert (resp.status, resp.peer_id, resp.payload, len(resp.fds)) == (OK, 9, "/dev/shm/seg", 4)
            for i, (fd, (_, w)) in enumerate(zip(resp.fds, pipes)):  # order preserved
                os.write(w, bytes([i]))
                assert os.read(fd, 1) == bytes([i])
                assert not os.get_inheritable(fd)  # MSG_CMSG_CLOEXEC (trap 33)
        finally:
            if resp is not None:
                resp.close()
            for _, w in pipes:
                os.close(w)
            a.close()
            b.close()

    def test_socket_five_fds_is_ctrunc_and_nothing_leaks(self):
        a, b = socket.socketpair()
        pipes = [pipe_fds() for _ in range(5)]
        try:
            frame = bootstrap.encode_response(OK, 1, "")
            a.sendmsg([frame], [rights(*[r for r, _ in pipes])], socket.MSG_NOSIGNAL)
            for r, _ in pipes:
                os.close(r)
            with pytest.raises(BootstrapError, match="MSG_CTRUNC"):
                bootstrap.recv_response(b, timeout=5)
            assert all(read_end_closed(w) for _, w in pipes)  # 4 closed by us, the 5th by the kernel
        finally:
            for _, w in pipes:
                os.close(w)
            a.close()
            b.close()

    def test_socket_error_frame_with_fd_is_refused(self):
        a, b = socket.socketpair()
        r, w = pipe_fds()
        try:
            a.sendmsg([bootstrap.encode_response(ERR, 0, "no")], [rights(r)], socket.MSG_NOSIGNAL)
            os.close(r)
            with pytest.raises(BootstrapError, match="must carry none"):
                bootstrap.recv_response(b, timeout=5)
            assert read_end_closed(w)
        finally:
            os.close(w)
            a.close()
            b.close()

    def test_recv_timeout(self):
        a, b = socket.socketpair()
        try:
            with pytest.raises(ShmTimeout):
                bootstrap.recv_response(b, timeout=0.05)
        finally:
            a.close()
            b.close()


# -- the listening socket -----------------------------------------------------------------------


def test_listen_socket_mode_stale_live_and_close(tmp_path):
    path = str(tmp_path / "a.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a stale socket file: nobody listens
    h1 = shmhub.Host(CONFIG)
    try:
        h1.listen(path)
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert h1.socket_path == path
        with pytest.raises(shmhub.ShmhubError, match="already listening"):
            h1.listen(str(tmp_path / "b.sock"))
        h2 = shmhub.Host(CONFIG)
        try:
            with pytest.raises(BootstrapError, match="live socket"):
                h2.listen(path)
            regular = tmp_path / "file"
            regular.write_text("keep me")
            with pytest.raises(BootstrapError, match="not a socket"):
                h2.listen(str(regular))
            assert regular.read_text() == "keep me"
        finally:
            h2.close()
        assert os.path.exists(path)  # h2 did not remove h1's socket
        link = shmhub.connect(path, timeout=5)
        echo_once(h1, link, b"still served")
        link.close()
        next_event(h1, "exited")
    finally:
        h1.close()
    assert not os.path.exists(path)
    with pytest.raises(BootstrapError, match="cannot connect"):
        shmhub.connect(path, timeout=2)


def test_connect_without_listener(tmp_path):
    with pytest.raises(BootstrapError, match="cannot connect"):
        shmhub.connect(str(tmp_path / "nobody.sock"), timeout=2)


def test_response_fds_and_who_claims(host, sock_path):
    """The host reserves; the guest claims. Fds arrive in wire order with the right kinds."""
    before = fd_count()
    resp = bootstrap.request(sock_path, timeout=5)
    try:
        assert resp.ok and resp.payload == "" and len(resp.fds) == 4  # anonymous segment: no path
        assert next_event(host, "attached").peer_id == resp.peer_id
        assert host.segment.peers.state_name(resp.peer_id) == "Reserved"  # the guest has not claimed yet
        bell, seg, rx, tx = (os.fstat(fd) for fd in resp.fds)
        assert stat.S_ISSOCK(bell.st_mode) and stat.S_ISREG(seg.st_mode) and stat.S_ISSOCK(rx.st_mode)
        assert seg.st_size == host.segment.size
        assert (rx.st_dev, rx.st_ino) == (tx.st_dev, tx.st_ino)  # one control socket both ways
        s = socket.socket(fileno=os.dup(resp.fds[0]))
        assert (s.family, s.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
        s.close()
        s = socket.socket(fileno=os.dup(resp.fds[2]))
        assert (s.family, s.type) == (socket.AF_UNIX, socket.SOCK_DGRAM)
        s.close()
    finally:
        resp.close()  # vanish without claiming: the host sees the doorbell hang up
    ev = next_event(host, "died")
    assert ev.peer_id == resp.peer_id and ev.reason == "doorbell hang-up"
    wait_for(lambda: peer_states(host) == ["Empty"] * CONFIG.max_guests, what="peers Empty")
    wait_for(lambda: fd_count() == before, what="host fds back to baseline")
    assert fd_count() == before


def test_named_segment_attach_and_bootstrap_side_by_side(shm_path, sock_path):
    with shmhub.Host(CONFIG, path=shm_path) as host:
        host.listen(sock_path)
        walk_in = shmhub.Guest.attach(shm_path)
        assert next_event(host, "attached").peer_id == walk_in.peer_id
        resp = bootstrap.request(sock_path, timeout=5)
        assert resp.ok and resp.payload == shm_path  # named segment: its path
        resp.close()
        next_event(host, "died")
        link = shmhub.connect(sock_path, timeout=5)
        assert next_event(host, "attached").peer_id == link.peer_id != walk_in.peer_id
        assert link.doorbell is not None and walk_in.doorbell is None
        echo_once(host, link, bytes(range(256)) * 200)  # slot tier
        walk_in.send(b"walk-in", timeout=5)
        h, msg = host.recv_any(timeout=10)
        with msg:
            assert h.peer_id == walk_in.peer_id and msg.tobytes() == b"walk-in"
        link.close()
        walk_in.close()
        kinds = {next_event(host, "exited").peer_id, next_event(host, "exited").peer_id}
        assert kinds == {link.peer_id, walk_in.peer_id}
        wait_for(lambda: peer_states(host) == ["Empty"] * CONFIG.max_guests, what="peers Empty")


# -- the guest refuses wrong fds (a host that does not follow the wire) ---------------------------


def _fake_host_once(path: str, peer_id: int, fds: list) -> threading.Thread:
    """Serve one connection: read the request, answer success with these fds, close."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    lsock.settimeout(10)

    def run():
        try:
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(10)
                assert conn.recv(4) == b"VSH1"
                conn.sendmsg([bootstrap.encode_response(OK, peer_id, "")], [rights(*fds)], socket.MSG_NOSIGNAL)
        finally:
            lsock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    "case, error, needle",
    [
        ("rx and tx differ", BootstrapError, "different sockets"),
        ("doorbell is a pipe", shmhub.PeerDead, "not a socket"),
        ("segment is a socket", shmhub.SegmentError, "not a regular file"),
        ("control is a stream socket", BootstrapError, "not a Unix datagram socket"),
        ("control is a pipe", BootstrapError, "control fd is not a socket"),  # found by the fuzzer
        ("peer_id beyond max_guests", BootstrapError, "peer_id 30 out of range 1..24"),
        ("peer not reserved", shmhub.PeerStateError, "is Empty, not Reserved"),
    ],
)
def test_guest_refuses_wrong_fds_and_closes_them(tmp_path, case, error, needle):
    path = str(tmp_path / "fake.sock")
    baseline = fd_count()
    seg = shmhub.Segment.create(CONFIG)
    bell_host, bell_guest = socket.socketpair()
    ctrl_a, ctrl_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    stream_a, stream_b = socket.socketpair()
    r, w = pipe_fds()
    try:
        peer_id = 1
        if case != "peer not reserved":
            seg.peers.reserve()
        fds = [bell_guest.fileno(), seg.fd, ctrl_a.fileno(), ctrl_a.fileno()]
        if case == "rx and tx differ":
            fds[3] = ctrl_b.fileno()
        elif case == "doorbell is a pipe":
            fds[0] = r
        elif case == "segment is a socket":
            fds[1] = stream_a.fileno()
        elif case == "control is a stream socket":
            fds[2] = fds[3] = stream_a.fileno()
        elif case == "control is a pipe":
            fds[2] = fds[3] = r
        elif case == "peer_id beyond max_guests":
            peer_id = 30
        t = _fake_host_once(path, peer_id, fds)
        with pytest.raises(error, match=needle):
            shmhub.connect(path, timeout=5)
        t.join(10)
        assert not t.is_alive()
        if case != "peer not reserved":
            assert seg.peers.state_name(1) == "Reserved"  # the guest claimed nothing
    finally:
        for x in (bell_host, bell_guest, ctrl_a, ctrl_b, stream_a, stream_b):
            x.close()
        os.close(r)
        os.close(w)
        seg.close()
    assert fd_count() == baseline  # every fd the guest received was closed


# -- 20 guest processes at once -----------------------------------------------------------------


def _serve(host, expected: int, errors: list, served: collections.Counter, stop: threading.Event) -> None:
    """Host side: verify every payload from its header, answer it reversed."""
    while sum(served.values()) < expected and not stop.is_set():
        try:
            h, msg = host.recv_any(timeout=0.2)
        except ShmTimeout:
            continue
        try:
            with msg:
                data, tier = msg.tobytes(), msg.tier
            idx, seq, n = guest_mod.HDR.unpack_from(data)
            if len(data) != n or data != guest_mod.payload(idx, seq, n):
                errors.append(f"guest {idx} message {seq}: content mismatch")
            if h.process is not None or h.link.doorbell is None:
                errors.append(f"peer {h.peer_id} is not a walk-in guest with a doorbell")
            served[tier] += 1
            h.link.send(data[::-1], timeout=20)
        except Exception as e:  # reported by the test, never swallowed
            errors.append(f"{type(e).__name__}: {e}")
            return


def test_twenty_guest_processes(host, sock_path):
    # host has the LONG request deadline: 20 processes starting on 2 cores can stall a guest between connect and send.
    n = 20
    sizes = (INLINE_SIZE, SLOT_SIZE, MMAP_SIZE)
    baseline = fd_count()
    errors: list = []
    served: collections.Counter = collections.Counter()
    stop = threading.Event()
    server = threading.Thread(target=_serve, args=(host, n * len(sizes), errors, served, stop), daemon=True)
    server.start()
    procs = [
        subprocess.Popen([sys.executable, GUEST, sock_path, str(i), ",".join(map(str, sizes))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=60)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        stop.set()
        server.join(10)
    assert not server.is_alive()
    assert not errors, errors
    for rc, out, err in outs:
        assert rc == 0, f"guest failed ({rc}): {out} {err}"
    reports = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
    for r in reports:
        assert r["doorbell"] is True
        assert (r["sent_inline"], r["sent_slot"], r["sent_mmap"]) == (1, 1, 1)
        assert (r["recv_inline"], r["recv_slot"], r["recv_mmap"]) == (1, 1, 1)
        assert r["sent_bytes_mmap"] == r["recv_bytes_mmap"] == MMAP_SIZE
    assert served == {"inline": n, "slot": n, "mmap": n}
    attached = [next_event(host, "attached", 20) for _ in range(n)]
    assert sorted(ev.pid for ev in attached) == sorted(p.pid for p in procs)  # SO_PEERCRED: the host can stop them
    exited = [next_event(host, "exited", 20) for _ in range(n)]
    assert sorted(ev.peer_id for ev in attached) == sorted(ev.peer_id for ev in exited)
    wait_for(lambda: peer_states(host) == ["Empty"] * CONFIG.max_guests, what="every peer Empty")
    wait_for(lambda: fd_count() == baseline, timeout=15, what=f"host fds back to {baseline}")
    assert fd_count() == baseline
    assert not host.guests
    assert host._listener.served == n


def test_killed_guest_is_recovered_by_doorbell_hang_up(host, sock_path):
    baseline = fd_count()
    proc = subprocess.Popen([sys.executable, GUEST, sock_path, "7", str(SLOT_SIZE), "hang"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        h, msg = host.recv_any(timeout=30)
        with msg:
            assert msg.tobytes() == guest_mod.payload(7, 0, SLOT_SIZE)
        assert h.process is None and h.alive
        assert next_event(host, "attached").peer_id == h.peer_id
        assert json.loads(proc.stdout.readline())["peer_id"] == h.peer_id
        proc.kill()
        proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ev = next_event(host, "died")
    assert ev.peer_id == h.peer_id and ev.reason == "doorbell hang-up"
    assert not h.alive
    wait_for(lambda: peer_states(host) == ["Empty"] * CONFIG.max_guests, what="peer Empty")
    wait_for(lambda: fd_count() == baseline, what="host fds back to baseline")
    assert fd_count() == baseline


def test_peer_table_full_is_an_error_response(sock_path):
    with shmhub.Host(shmhub.SegmentConfig(max_guests=1)) as host:
        host.listen(sock_path)
        first = shmhub.connect(sock_path, timeout=5)
        wait_for(lambda: host._listener.idle, what="the listener done with the first guest")
        baseline = fd_count()
        with pytest.raises(BootstrapRefused, match="PeerTableFull: all 1 peer entries are in use"):
            shmhub.connect(sock_path, timeout=5)
        assert peer_states(host) == ["Attached"]
        wait_for(lambda: host._listener.idle and fd_count() == baseline, what="host fds back to baseline")
        assert fd_count() == baseline
        first.close()
        next_event(host, "exited")
        wait_for(lambda: peer_states(host) == ["Empty"], what="peer Empty")
        second = shmhub.connect(sock_path, timeout=5)  # the entry is usable again
        assert second.peer_id == 1
        second.close()
        next_event(host, "exited")


# -- malformed requests -------------------------------------------------------------------------

ANSWERED = {
    "bad magic": (b"XSH1", False, "bad request magic b'XSH1'"),
    "bad magic, short": (b"V\x00", False, "bad request magic"),
    "older RSH0": (b"RSH0\x03\x00abc", False, "older RSH0"),
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, "bad request magic"),
    "oversize": (b"VSH1" + bytes(60), False, "longer than 4 bytes"),
    "oversize by one": (b"VSH1!", False, "longer than 4 bytes"),
    "short, then half-close": (b"VS", True, "short request: 2 of 4 bytes, then end of stream"),
    "empty, then half-close": (b"", True, None),
    "short, then silent": (b"VSH", False, "no complete request within 0.5 s (got 3 of 4 bytes)"),
    "silent": (b"", False, "no complete request within 0.5 s (got nothing)"),
}


@pytest.mark.parametrize("case, host", [(c, SHORT if "silent" in c else LONG) for c in ANSWERED], indirect=["host"])
def test_malformed_request_is_answered(host, sock_path, case):
    data, half_close, needle = ANSWERED[case]
    baseline = fd_count()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(sock_path)
        if data:
            s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        if needle is None:  # nothing said at all: the host just hangs up
            assert s.recv(64) == b""
        else:
            resp = bootstrap.recv_response(s, timeout=10)
            assert (resp.status, resp.peer_id, resp.fds) == (ERR, 0, ())
            assert needle in resp.payload
            assert s.recv(64) == b""  # then the host closes the connection
    finally:
        s.close()
    assert host._listener.served == 0
    wait_for(lambda: host._listener.idle and fd_count() == baseline, what="host fds back to baseline")
    assert fd_count() == baseline
    assert peer_states(host) == ["Empty"] * CONFIG.max_guests  # nothing was ever reserved
    assert no_events(host)
    link = shmhub.connect(sock_path, timeout=5)  # the listener still serves
    echo_once(host, link, b"after " + case.encode())
    link.close()
    next_event(host, "exited")


@pytest.mark.parametrize("host", [SHORT], indirect=True)
def test_request_after_the_deadline_reports_the_hosts_reason(host, sock_path):
    """A guest stalled past request_timeout gets the host's diagnostic, not a bare broken pipe."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        assert select.select([s], [], [], 10)[0] == [s]  # the host refused us and hung up
        resp = bootstrap.exchange(s, timeout=5)
        assert (resp.status, resp.peer_id, resp.fds) == (ERR, 0, ())
        assert "no complete request within 0.5 s (got nothing)" in resp.payload
    finally:
        s.close()
    assert host._listener.served == 0
    wait_for(lambda: host._listener.idle, what="the connection closed")
    assert peer_states(host) == ["Empty"] * CONFIG.max_guests


DROPPED = {
    "connect and close": b"",
    "short, then close": b"VS",
    "garbage, then close": b"garbage!",
    "request, then close": b"VSH1",  # valid: a peer is prepared, the answer finds nobody
}


@pytest.mark.parametrize("case", list(DROPPED))
def test_peer_that_closes_is_dropped(host, sock_path, case):
    baseline = fd_count()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with host._lock:  # the listener cannot reserve a peer before the peer is gone: its send must fail
        s.connect(sock_path)
        if DROPPED[case]:
            s.sendall(DROPPED[case])
        s.close()
    wait_for(lambda: host._listener.accepted == 1 and host._listener.idle, what="the connection handled")
    assert host._listener.served == 0
    wait_for(lambda: fd_count() == baseline, what="host fds back to baseline")
    assert fd_count() == baseline
    assert peer_states(host) == ["Empty"] * CONFIG.max_guests  # the reservation was released
    assert no_events(host)
    link = shmhub.connect(sock_path, timeout=5)
    echo_once(host, link, b"x" * SLOT_SIZE)
    link.close()
    next_event(host, "exited")


def test_sends_survive_default_sigpipe(tmp_path):
    """Trap 30: a process that has not ignored SIGPIPE is not killed by answering a peer that left."""
    code = (
        "import signal, socket, sys\n"
        "from shmhub import bootstrap\n"
        "signal.signal(signal.SIGPIPE, signal.SIG_DFL)\n"
        "a, b = socket.socketpair()\n"
        "b.close()\n"
        "assert bootstrap.send_error(a, 'bye') is False\n"
        "try:\n"
        "    bootstrap.send_response(a, 0, 1, '', [a.fileno()] * 4)\n"
        "except bootstrap.PeerHungUp:\n"
        "    print('survived')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout.strip()) == (0, "survived"), out.stderr


def test_spawned_and_bootstrapped_guests_share_one_host(host, sock_path):
    """spawn and the bootstrap prepare peers through the same helper; both kinds work side by side."""
    child = "import shmhub\nl = shmhub.connect()\nl.send(l.recv_bytes(timeout=20)[::-1], timeout=20)\nl.close()\n"
    g = host.spawn([sys.executable, "-c", child])
    link = shmhub.connect(sock_path, timeout=5)
    assert link.peer_id != g.peer_id
    assert next_event(host, "spawned").pid == g.pid
    assert next_event(host, "attached").peer_id == link.peer_id
    g.link.send(b"spawned child", timeout=10)
    h, msg = host.recv_any(timeout=30)
    with msg:
        assert (h.peer_id, msg.tobytes()) == (g.peer_id, b"dlihc denwaps")
    echo_once(host, link, b"b" * MMAP_SIZE)
    assert g.wait(30) == 0
    link.close()
    assert {next_event(host, "exited").peer_id, next_event(host, "exited").peer_id} == {g.peer_id, link.peer_id}
    wait_for(lambda: peer_states(host) == ["Empty"] * CONFIG.max_guests, what="peers Empty")


def test_silent_peers_do_not_block_a_guest(sock_path):
    with shmhub.Host(CONFIG) as host:
        host.listen(sock_path, request_timeout=5.0)
        baseline = fd_count()
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            silent.connect(sock_path)
            partial.connect(sock_path)
            partial.sendall(b"VS")
            wait_for(lambda: host._listener.pending == 2, what="both pending")
            link = shmhub.connect(sock_path, timeout=2)  # served while both others wait for their deadline
            echo_once(host, link, b"m" * MMAP_SIZE)
            assert select.select([silent, partial], [], [], 0)[0] == []  # neither has been answered yet
            assert host._listener.pending == 2
            link.close()
            next_event(host, "exited")
            for s, got in ((silent, "got nothing"), (partial, "got 2 of 4 bytes")):
                resp = bootstrap.recv_response(s, timeout=10)
                assert resp.status == ERR and f"no complete request within 5.0 s ({got})" in resp.payload
        finally:
            silent.close()
            partial.close()
        wait_for(lambda: host._listener.idle and fd_count() == baseline, what="host fds back to baseline")
        assert fd_count() == baseline
        assert peer_states(host) == ["Empty"] * CONFIG.max_guests


def test_close_drops_pending_connections(sock_path):
    host = shmhub.Host(CONFIG)
    host.listen(sock_path, request_timeout=30)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        wait_for(lambda: host._listener.pending == 1, what="pending")
        host.close()
        s.settimeout(5)
        assert s.recv(64) == b""  # dropped by close(), long before its deadline
        assert not os.path.exists(sock_path)
    finally:
        s.close()
        host.close()


def test_recv_any_asleep_is_woken_by_a_walk_in_registered_after_it_sent(sock_path, monkeypatch):
    """The listener answers a walk-in first and registers it after: a guest that sends at once does
    so before the host watches it (its consumer flag down: no doorbell). A recv_any already asleep
    must be woken by the registration, not by its own timeout (seen: 10 s lost, under load)."""
    real = shmhub.Host._register

    def late_register(self, *args):
        time.sleep(0.2)  # the guest's send lands in between
        return real(self, *args)

    monkeypatch.setattr(shmhub.Host, "_register", late_register)
    with shmhub.Host(CONFIG) as host:
        host.listen(sock_path)
        got = []
        waiter = threading.Thread(target=lambda: got.append(host.recv_any(timeout=20)))
        waiter.start()  # activates recv_any with no guest, and sleeps
        link = shmhub.connect(sock_path, timeout=10)
        t0 = time.monotonic()
        link.send(b"early", timeout=10)
        waiter.join(30)
        elapsed = time.monotonic() - t0
        assert got, "recv_any did not return"
        h, msg = got[0]
        with msg:
            assert msg.tobytes() == b"early" and h.peer_id == link.peer_id
        assert elapsed < 10, f"recv_any slept {elapsed:.1f} s: woken by its timeout, not the registration"
        link.close()
