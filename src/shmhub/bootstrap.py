"""Bootstrap of walk-in guests over a Unix stream socket (format-v7 1.11, DECISIONS 17; docs/bootstrap.md).

The wire, guest -> host: exactly the 4 bytes ``VSH1``. Host -> guest, in ONE ``sendmsg``:

    0  magic "VSP1"   4  u8 status (0 ok, 1 error)   5  u32 LE peer_id (0 on error)
    9  u16 LE payload_len   11  payload (UTF-8: segment path, "" if anonymous; or a diagnostic)

and, on success only, exactly 4 fds in one SCM_RIGHTS cmsg: doorbell, segment, mmap_rx, mmap_tx.
Our mmap control channel is one SOCK_DGRAM socketpair end used both ways, so the host passes the
guest's control end as both mmap_rx and mmap_tx; the guest checks they are one socket and closes
the duplicate.

Decoding is strict (exact lengths, known status, exact fd count, no truncated control data) and
closes every fd that arrived with a frame it refuses (traps 35-37). Sends use MSG_NOSIGNAL (trap 30).

The listener admits a connection only if its SO_PEERCRED uid is ours or allowed (docs/guides/security.md);
a refusal is an ordinary error response whose diagnostic starts with CREDENTIALS_REFUSED.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

from . import layout as L
from .errors import BootstrapError, BootstrapExhausted, ShmTimeout

_HDR = struct.Struct("<4sBIH")  # magic, status, peer_id, payload_len
assert _HDR.size == L.BOOTSTRAP_RESPONSE_HEADER_SIZE == L.BR_PAYLOAD
assert struct.calcsize("<4sB") == L.BR_PEER_ID and struct.calcsize("<4sBI") == L.BR_PAYLOAD_LEN

RECV_BUFSIZE = L.BOOTSTRAP_RESPONSE_HEADER_SIZE + L.BOOTSTRAP_MAX_PAYLOAD  # the largest legal frame
RECV_ANCSIZE = socket.CMSG_SPACE(L.BOOTSTRAP_NUM_FDS * 4)  # room for exactly 4 fds: a 5th sets MSG_CTRUNC
_SEND_FLAGS = socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT
DEFAULT_REQUEST_TIMEOUT = 2.0  # host: a connection must deliver its request within this
DEFAULT_TIMEOUT = 5.0  # guest: connect + request + response
# A shmhub convention inside the diagnostic, not a wire field: the guest raises PeerCredentialsRefused for it.
CREDENTIALS_REFUSED = "peer credentials refused"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (Linux)

log = logging.getLogger("shmhub")


class PeerHungUp(BootstrapError):
    """Host side: the connecting peer went away before (or while) we answered. Nothing to tell it."""


@dataclass(frozen=True)
class Response:
    """A decoded VSP1 response. On success `fds` are (doorbell, segment, mmap_rx, mmap_tx) and belong
    to the caller (close() them if unused); on error `fds` is empty and `payload` is the diagnostic."""

    status: int
    peer_id: int
    payload: str
    fds: Tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == L.BOOTSTRAP_STATUS_OK

    def close(self) -> None:
        _close_all(self.fds)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- request ----------------------------------------------------------------------------------


def encode_request() -> bytes:
    return L.BOOTSTRAP_REQUEST


def request_incomplete(data: Union[bytes, bytearray]) -> bool:
    """True while `data` is a proper prefix of the request (the host waits for more bytes)."""
    return len(data) < L.BOOTSTRAP_REQUEST_SIZE and L.BOOTSTRAP_REQUEST.startswith(bytes(data))


def decode_request(data: bytes) -> None:
    """Accept exactly ``VSH1``; anything else raises BootstrapError with a diagnostic for the peer."""
    data = bytes(data)
    if data == L.BOOTSTRAP_REQUEST:
        return
    if data.startswith(L.BOOTSTRAP_REQUEST_OLD):
        raise BootstrapError(f"request uses the older {L.BOOTSTRAP_REQUEST_OLD.decode()} bootstrap; this host speaks {L.BOOTSTRAP_REQUEST.decode()} (trap 40)")
    head = data[: L.BOOTSTRAP_REQUEST_SIZE]
    if not L.BOOTSTRAP_REQUEST.startswith(head):
        raise BootstrapError(f"bad request magic {head!r}; expected {L.BOOTSTRAP_REQUEST!r}")
    if len(data) < L.BOOTSTRAP_REQUEST_SIZE:
        raise BootstrapError(f"short request: {len(data)} of {L.BOOTSTRAP_REQUEST_SIZE} bytes")
    raise BootstrapError(f"request longer than {L.BOOTSTRAP_REQUEST_SIZE} bytes ({len(data)} or more); it must be exactly {L.BOOTSTRAP_REQUEST!r}")


# -- response ---------------------------------------------------------------------------------


def _utf8(payload: Union[str, bytes]) -> bytes:
    if isinstance(payload, str):
        raw = payload.encode("utf-8")
    else:
        raw = bytes(payload)
        raw.decode("utf-8")  # UnicodeDecodeError is a ValueError
    if len(raw) > L.BOOTSTRAP_MAX_PAYLOAD:
        raise ValueError(f"bootstrap payload of {len(raw)} bytes exceeds {L.BOOTSTRAP_MAX_PAYLOAD}")
    return raw


def encode_response(status: int, peer_id: int, payload: Union[str, bytes] = "") -> bytes:
    """The whole VSP1 frame (fds travel beside it, see send_response)."""
    if status == L.BOOTSTRAP_STATUS_OK:
        if not 1 <= peer_id <= L.MAX_GUESTS_LIMIT:
            raise ValueError(f"a success response needs a peer_id in 1..{L.MAX_GUESTS_LIMIT}, got {peer_id}")
    elif status == L.BOOTSTRAP_STATUS_ERROR:
        if peer_id != 0:
            raise ValueError(f"an error response must carry peer_id 0, got {peer_id}")
    else:
        raise ValueError(f"status must be {L.BOOTSTRAP_STATUS_OK} or {L.BOOTSTRAP_STATUS_ERROR}, got {status}")
    raw = _utf8(payload)
    return _HDR.pack(L.BOOTSTRAP_RESPONSE_MAGIC, status, peer_id, len(raw)) + raw


def clip_diagnostic(text: str) -> str:
    """A diagnostic cut to fit the u16 payload_len, never in the middle of a UTF-8 sequence."""
    raw = text.encode("utf-8", "replace")
    return raw[: L.BOOTSTRAP_MAX_PAYLOAD].decode("utf-8", "ignore")


def decode_response(data: bytes, ancdata: Sequence[Tuple[int, int, bytes]] = (), flags: int = 0) -> Response:
    """Decode what one recvmsg returned. Every fd that arrived is closed if the frame is refused."""
    fds: list[int] = []
    rights = others = 0
    for level, kind, body in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            rights += 1
            usable = len(body) - len(body) % 4  # a truncated cmsg may end in a partial int
            fds.extend(array.array("i", bytes(body[:usable])))
        else:
            others += 1
    try:
        if flags & socket.MSG_CTRUNC and len(fds) < L.BOOTSTRAP_NUM_FDS and not others:
            # The kernel drops the fds this process has no room for (EMFILE): not a protocol error.
            raise BootstrapExhausted(
                errno.EMFILE,
                f"only {len(fds)} of the host's {L.BOOTSTRAP_NUM_FDS} fds arrived (closed again): "
                "this process is out of file descriptors (raise RLIMIT_NOFILE)",
            )
        if flags & socket.MSG_CTRUNC:
            raise BootstrapError(
                f"bootstrap response control data truncated (MSG_CTRUNC): the host sent more than {L.BOOTSTRAP_NUM_FDS} fds; {len(fds)} arrived and were closed"
            )
        if flags & socket.MSG_TRUNC:
            raise BootstrapError("bootstrap response truncated (MSG_TRUNC)")
        if others:
            raise BootstrapError(f"bootstrap response carries {others} control message(s) other than SCM_RIGHTS")
        if rights > 1:
            raise BootstrapError(f"bootstrap response carries {rights} SCM_RIGHTS messages; the fds must come in one")
        n = len(data)
        if n == 0:
            raise BootstrapError("the host closed the connection without a response")
        if n < L.BOOTSTRAP_RESPONSE_HEADER_SIZE:
            raise BootstrapError(f"bootstrap response truncated: {n} bytes, the header alone is {L.BOOTSTRAP_RESPONSE_HEADER_SIZE}")
        magic, status, peer_id, plen = _HDR.unpack_from(data)
        if magic != L.BOOTSTRAP_RESPONSE_MAGIC:
            raise BootstrapError(f"bad bootstrap response magic {magic!r}; expected {L.BOOTSTRAP_RESPONSE_MAGIC!r}")
        if status not in (L.BOOTSTRAP_STATUS_OK, L.BOOTSTRAP_STATUS_ERROR):
            raise BootstrapError(f"bootstrap response has status {status}: protocol error")
        if n != L.BOOTSTRAP_RESPONSE_HEADER_SIZE + plen:
            raise BootstrapError(f"bootstrap response is {n} bytes but its header announces {L.BOOTSTRAP_RESPONSE_HEADER_SIZE} + {plen}")
        try:
            payload = bytes(data[L.BR_PAYLOAD :]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BootstrapError(f"bootstrap response payload is not UTF-8: {e}") from None
        if status == L.BOOTSTRAP_STATUS_ERROR:
            if peer_id != 0:
                raise BootstrapError(f"bootstrap error response carries peer_id {peer_id}; it must be 0")
            if fds:
                raise BootstrapError(f"bootstrap error response carries {len(fds)} fds; it must carry none")
        else:
            if not 1 <= peer_id <= L.MAX_GUESTS_LIMIT:
                raise BootstrapError(f"bootstrap success response carries peer_id {peer_id}; it must be 1..{L.MAX_GUESTS_LIMIT}")
            if len(fds) != L.BOOTSTRAP_NUM_FDS:
                raise BootstrapError(
                    f"bootstrap success response carries {len(fds)} fds; it must carry exactly {L.BOOTSTRAP_NUM_FDS} (doorbell, segment, mmap_rx, mmap_tx)"
                )
        return Response(status, peer_id, payload, tuple(fds))
    except BaseException:
        _close_all(fds)
        raise


def send_response(sock: socket.socket, status: int, peer_id: int, payload: Union[str, bytes] = "", fds: Sequence[int] = ()) -> None:
    """Send a whole response frame and its fds in ONE sendmsg (trap 35), MSG_NOSIGNAL (trap 30).
    PeerHungUp if the peer is gone or the frame did not go out whole."""
    frame = encode_response(status, peer_id, payload)
    want = L.BOOTSTRAP_NUM_FDS if status == L.BOOTSTRAP_STATUS_OK else 0
    if len(fds) != want:
        raise ValueError(f"status {status} must be sent with {want} fds, got {len(fds)}")
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sent = sock.sendmsg([frame], anc, _SEND_FLAGS)
    except OSError as e:
        raise PeerHungUp(f"cannot send the bootstrap response: {e.strerror or e}") from None
    if sent != len(frame):
        raise PeerHungUp(f"bootstrap response went out partially ({sent} of {len(frame)} bytes)")


def send_error(sock: socket.socket, diagnostic: str) -> bool:
    """Best effort: tell a peer why it is refused. False if it is gone."""
    try:
        send_response(sock, L.BOOTSTRAP_STATUS_ERROR, 0, clip_diagnostic(diagnostic))
        return True
    except PeerHungUp:
        return False


def recv_response(sock: socket.socket, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Response:
    """Receive the response with one recvmsg (11 + 65535 bytes, room for 4 fds), close-on-exec fds."""
    sock.settimeout(timeout)
    try:
        data, anc, flags, _ = sock.recvmsg(RECV_BUFSIZE, RECV_ANCSIZE, socket.MSG_CMSG_CLOEXEC)
    except TimeoutError:
        raise ShmTimeout(f"no bootstrap response within {timeout} s") from None
    except OSError as e:
        raise BootstrapError(f"bootstrap response not received: {e.strerror or e}") from None
    return decode_response(data, anc, flags)


def request(socket_path: Union[str, os.PathLike[str]], timeout: Optional[float] = DEFAULT_TIMEOUT) -> Response:
    """Guest side: connect, send VSH1, return the host's response (ok or error; raises on a bad frame)."""
    path = os.fspath(socket_path)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise BootstrapExhausted(e.errno, f"cannot open a socket to {path}: {e.strerror}") from None
        raise
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except TimeoutError:
            raise ShmTimeout(f"connecting to {path} took longer than {timeout} s") from None
        except OSError as e:
            raise BootstrapError(f"cannot connect to the bootstrap socket {path}: {e.strerror or e}") from None
        return exchange(sock, None if deadline is None else max(0.0, deadline - time.monotonic()))
    finally:
        sock.close()


def exchange(sock: socket.socket, timeout: Optional[float] = DEFAULT_TIMEOUT) -> Response:
    """Guest side, on a connected socket: send VSH1, receive and decode the response."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        sock.sendall(encode_request(), socket.MSG_NOSIGNAL)
    except TimeoutError:
        raise ShmTimeout(f"sending the bootstrap request took longer than {timeout} s") from None
    except OSError as e:
        # The host may have refused us already (our request came too late, say): show its reason.
        try:
            early = recv_response(sock, 0.5)
        except (BootstrapError, ShmTimeout):
            early = None
        if early is not None and not early.ok:
            return early
        if early is not None:
            early.close()
        raise BootstrapError(f"cannot send the bootstrap request: {e.strerror or e}") from None
    return recv_response(sock, None if deadline is None else max(0.0, deadline - time.monotonic()))


# -- host side: the listening socket ----------------------------------------------------------


class PeerCred(NamedTuple):
    """SO_PEERCRED of a connected Unix socket: the peer's pid, euid and egid when it called connect()."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    """The kernel's record of who is at the other end (not spoofable by the peer)."""
    return PeerCred(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


def _ids(name: str, ids: Iterable[int]) -> FrozenSet[int]:
    if isinstance(ids, (str, bytes, int)):
        raise TypeError(f"{name} must be an iterable of ints, got {ids!r}")
    out = frozenset(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {i!r}")
    return out


def _is_live(path: str) -> bool:
    """Does a process accept connections on this socket path? A refused connect means stale."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True  # backlog full, timeout, no permission: someone is there, or we cannot tell; do not clobber
    finally:
        probe.close()


def _bind(path: str, backlog: int, mode: int = 0o600) -> Tuple[socket.socket, Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise BootstrapError(f"{path} exists and is not a socket; refusing to replace it")
        if _is_live(path):
            raise BootstrapError(f"{path} is a live socket (another process listens there); pick another path or stop it")
        try:
            os.unlink(path)  # stale: its listener is gone
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec
    try:
        sock.bind(path)
        try:
            # Until listen() every connect is refused, so the umask's wider mode is never usable.
            os.chmod(path, mode)
            sock.listen(backlog)
            sock.setblocking(False)
            st = os.stat(path)
        except BaseException:
            os.unlink(path)
            raise
    except OSError as e:
        sock.close()
        raise BootstrapError(f"cannot listen on {path}: {e.strerror or e}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


class _Pending:
    __slots__ = ("sock", "fd", "buf", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.fd, self.buf, self.deadline = sock, sock.fileno(), bytearray(), deadline


class Listener:
    """Accepts bootstrap connections in one thread. Each connection has its own deadline and is read
    without blocking, so a silent or slow peer never holds up another. For a valid request it calls
    `serve(conn)`, which sends the success response (PeerHungUp if the peer is gone); any other
    exception from serve becomes an error response. A peer whose SO_PEERCRED uid is not ours, not in
    allow_uids and whose gid is not in allow_gids is refused at accept, before it holds anything."""

    def __init__(
        self,
        path: Union[str, os.PathLike[str]],
        serve: Callable[[socket.socket], None],
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        backlog: int = 128,
        max_pending: int = 128,
        allow_uids: Iterable[int] = (),
        allow_gids: Iterable[int] = (),
    ) -> None:
        if not request_timeout > 0:
            raise ValueError("request_timeout must be > 0")
        # Who may bootstrap: our own euid, plus these uids, plus peers whose egid is in allow_gids.
        self.allow_uids = _ids("allow_uids", allow_uids) | {os.geteuid()}
        self.allow_gids = _ids("allow_gids", allow_gids)
        # Another user must be able to connect() for the allow-list to mean anything: then the file
        # mode stops being the gate and SO_PEERCRED is (root ignores the mode, so uid 0 needs no widening).
        self.mode = 0o666 if self.allow_gids or self.allow_uids - {os.geteuid(), 0} else 0o600
        self.path = os.fspath(path)
        self.request_timeout = request_timeout
        self.max_pending = max_pending
        self.accepted = self.served = self.refused = self.dropped = 0  # accepted = the other three + pending
        self._serve = serve
        self._pending: Dict[int, _Pending] = {}
        self._stopping = False
        self._closed = False
        self._sock, self._ident = _bind(self.path, backlog, self.mode)
        try:
            self._epoll = select.epoll()
            try:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except BaseException:
                self._epoll.close()
                raise
        except BaseException:
            self._unbind()
            raise
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._epoll.register(self._sock.fileno(), select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="shmhub-bootstrap", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Connections still waiting for their request."""
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Every accepted connection has been answered or dropped, and closed."""
        return self.accepted == self.served + self.refused + self.dropped

    def _run(self) -> None:
        lsock = self._sock.fileno()
        while not self._stopping:
            if self._pending:
                timeout = max(0.0, min(p.deadline for p in self._pending.values()) - time.monotonic())
            else:
                timeout = -1
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            except (OSError, ValueError):
                return  # closed under us (close() called from this thread)
            for fd, _ in events:
                if self._stopping:
                    break
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif fd == lsock:
                    self._accept()
                else:
                    p = self._pending.get(fd)
                    if p is not None:
                        self._guard(self._readable, p)
            now = time.monotonic()
            for p in [p for p in self._pending.values() if p.deadline <= now]:
                got = f"{len(p.buf)} of {L.BOOTSTRAP_REQUEST_SIZE} bytes" if p.buf else "nothing"
                self._guard(self._refuse, p, f"no complete request within {self.request_timeout} s (got {got})")

    def _guard(self, fn: Callable[..., object], p: _Pending, *args: object) -> None:
        """One connection's trouble never stops the loop: on anything unexpected, drop it."""
        try:
            fn(p, *args)
        except Exception:
            self._finish(p)
            self.dropped += 1

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError:
                time.sleep(0.01)  # out of fds (EMFILE/ENFILE): do not spin; pending ones expire meanwhile
                return
            self.accepted += 1
            conn.setblocking(False)
            if not self._admit(conn):
                conn.close()
                self.refused += 1
                continue
            p = _Pending(conn, time.monotonic() + self.request_timeout)
            if len(self._pending) >= self.max_pending:
                send_error(conn, f"too many bootstrap connections pending ({self.max_pending}); try again")
                conn.close()
                self.refused += 1
                continue
            try:
                self._epoll.register(conn.fileno(), select.EPOLLIN)
            except OSError:
                conn.close()
                self.dropped += 1
                continue
            self._pending[p.fd] = p

    def _admit(self, conn: socket.socket) -> bool:
        """SO_PEERCRED policy. Refused here, the peer never reaches _pending nor a peer entry; the
        socket's 0600 mode already keeps other users out, so this catches root peers (who ignore the
        mode) and sockets whose mode or directory someone widened."""
        try:
            cred = peer_credentials(conn)
        except OSError as e:
            log.warning("bootstrap on %s: cannot read the peer's credentials (%s); refused", self.path, e.strerror or e)
            send_error(conn, f"{CREDENTIALS_REFUSED}: the host cannot read them")
            return False
        if cred.uid in self.allow_uids or cred.gid in self.allow_gids:
            return True
        log.warning(
            "bootstrap on %s: refused pid %d uid %d gid %d (allowed uids %s, gids %s; see Host.listen(allow_uids=...))",
            self.path,
            cred.pid,
            cred.uid,
            cred.gid,
            sorted(self.allow_uids),
            sorted(self.allow_gids),
        )
        # The allow-lists stay in the host's log: a refused peer learns only that it is refused.
        send_error(conn, f"{CREDENTIALS_REFUSED}: uid {cred.uid} (gid {cred.gid}) is not allowed to attach to this host (Host.listen(allow_uids=...))")
        return False

    def _readable(self, p: _Pending) -> None:
        try:
            data = p.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._finish(p)  # reset by the peer
            self.dropped += 1
            return
        if not data:
            if p.buf:
                self._refuse(p, f"short request: {len(p.buf)} of {L.BOOTSTRAP_REQUEST_SIZE} bytes, then end of stream")
            else:
                self._finish(p)  # connected and closed: nobody to answer
                self.dropped += 1
            return
        p.buf += data
        if request_incomplete(p.buf):
            return
        got = bytes(p.buf)
        if len(got) == L.BOOTSTRAP_REQUEST_SIZE:
            try:  # more bytes already behind these 4: the request is too long
                got += p.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                pass  # nothing more (EAGAIN), or the peer is gone: the answer's send will tell
        try:
            decode_request(got)
        except BootstrapError as e:
            self._refuse(p, str(e))
            return
        self._unregister(p)
        try:
            self._serve(p.sock)
            outcome = "served"
        except PeerHungUp:
            outcome = "dropped"
        except Exception as e:
            send_error(p.sock, f"{type(e).__name__}: {e}")
            outcome = "refused"
        finally:
            p.sock.close()
        setattr(self, outcome, getattr(self, outcome) + 1)  # counted once closed: `idle` means no fd left

    def _refuse(self, p: _Pending, diagnostic: str) -> None:
        send_error(p.sock, diagnostic)
        self._finish(p)
        self.refused += 1

    def _unregister(self, p: _Pending) -> None:
        if self._pending.get(p.fd) is p:
            del self._pending[p.fd]
            try:
                self._epoll.unregister(p.fd)
            except (OSError, ValueError):
                pass

    def _finish(self, p: _Pending) -> None:
        self._unregister(p)
        p.sock.close()

    def _unbind(self) -> None:
        self._sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:  # never remove another listener's socket
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Stop accepting, drop connections still waiting, remove the socket path."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        os.write(self._wake_w, b"x")
        if threading.current_thread() is not self._thread:
            self._thread.join()
        for p in list(self._pending.values()):
            self._finish(p)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._unbind()

    def __repr__(self) -> str:
        return f"<Listener {self.path} pending={len(self._pending)} served={self.served} refused={self.refused}>"


__all__ = [
    "CREDENTIALS_REFUSED",
    "Listener",
    "PeerCred",
    "PeerHungUp",
    "Response",
    "clip_diagnostic",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "exchange",
    "peer_credentials",
    "recv_response",
    "request",
    "request_incomplete",
    "send_error",
    "send_response",
]
