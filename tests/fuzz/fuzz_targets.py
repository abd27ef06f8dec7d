"""Fuzz targets: every parser of bytes that shmhub does not control (docs/hardening.md).

Each target takes one input (bytes) and feeds it to one parser the way the library meets such
bytes: a frame in a ring, a whole segment written by another process, a control datagram with
its fds, a bootstrap response, an RPC or HTTP message, the executor's fd socket. The property,
checked by `run_one`: the parser returns, or raises a `shmhub.errors.ShmhubError`. Any other
exception, a crash, a hang or a leaked fd is a bug.

The targets are plain functions (no atheris here), so the test suite replays the committed
corpus without the fuzzer, and fuzz_run.py drives them under atheris for coverage-guided runs.
"""

from __future__ import annotations

import array
import os
import socket
import struct
from typing import Callable, Dict, List, Optional

from shmhub import bootstrap, guest, monitor
from shmhub import layout as L
from shmhub._native import Region, Ring, decode_frame
from shmhub.bigmap import MapReceiver
from shmhub.errors import ShmhubError
from shmhub.link import GUEST, HOST, Link
from shmhub.segment import Segment

TARGETS: Dict[str, Callable[[bytes], None]] = {}


def target(fn: Callable[[bytes], None]) -> Callable[[bytes], None]:
    TARGETS[fn.__name__] = fn
    return fn


def any_target(data: bytes) -> None:
    """Every target in one: the first byte picks it (the test suite's single atheris smoke run)."""
    if data:
        names = sorted(TARGETS)
        TARGETS[names[data[0] % len(names)]](data[1:])


def run_one(name: str, data: bytes, on_error: Optional[Callable[[ShmhubError], None]] = None) -> None:
    """Run target `name` on `data`: a ShmhubError is a parse failure (fine), anything else propagates.
    `on_error` sees each such error (the fuzzer's feedback on which check refused the input)."""
    try:
        (any_target if name == "any" else TARGETS[name])(data)
    except ShmhubError as e:
        if on_error is not None:
            on_error(e)


class Input:
    """Takes typed values off the front of a fuzz input; past its end every value is 0/empty."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        b = self.take(1)
        return b[0] if b else 0

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8).ljust(8, b"\0"), "little")

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


def _memfd(content: bytes, size: Optional[int] = None, seal: bool = False) -> int:
    fd = os.memfd_create("shmhub-fuzz", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    try:
        if content:
            os.write(fd, content)
        if size is not None:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- 1. the frame decoder -----------------------------------------------------------------------


@target
def frame(data: bytes) -> None:
    """decode_frame: one ring frame (header + body) from arbitrary bytes."""
    out = decode_frame(data)
    assert out[1] <= len(data)


# -- 2. a ring whose header and data another process wrote --------------------------------------

_RING_MAP = 4096
_ring_fd = -1
_ring_region: Optional[Region] = None


def _ring_scratch() -> Region:
    global _ring_fd, _ring_region
    if _ring_region is None or _ring_region.closed:
        _ring_fd = _memfd(b"", _RING_MAP)
        _ring_region = Region(_ring_fd, _RING_MAP, True)
    return _ring_region


def close_scratch() -> None:
    """Release the module's scratch mappings and sockets (the smoke test calls it at the end)."""
    global _ring_fd, _ring_region, _ctrl
    if _ring_region is not None:
        _ring_region.close()
        os.close(_ring_fd)
        _ring_region, _ring_fd = None, -1
    if _ctrl is not None:
        for s in _ctrl:
            s.close()
        _ctrl = None


@target
def ring(data: bytes) -> None:
    """A ring (header at 0, data after it) in a 4 KiB mapping, all bytes from the input, then up
    to 16 consumer and producer operations chosen by the input's first bytes."""
    inp = Input(data)
    ops = inp.take(16)
    image = inp.rest()[:_RING_MAP]
    region = _ring_scratch()
    region.zero(0, _RING_MAP)
    region.write(0, image)
    r = Ring(region, 0)
    for op in ops:
        k = op & 0x0F
        n = op >> 4
        if k == 0:
            r.recv_inline()
        elif k == 1:
            f = r.read_frame()
            if f is not None:
                r.release(f[1])
        elif k == 2:
            r.recv_inline_many(n + 1)
        elif k == 3:
            start, avail = r.readable()
            if avail:
                r.read_data(start, min(avail, 8))
        elif k == 4:
            r.has_data()
            r.can_grant(4 * (n + 2))
        elif k == 5:
            r.send_inline(b"x" * (n * 5), True)
        elif k == 6:
            off = r.grant(4 * (n + 2))
            if off is not None and off >= 0:
                r.commit(4 * (n + 2))
        elif k == 7:
            r.spin_readable(0)
            r.spin_room(4 * (n + 2), 0)
        elif k == 8:
            r.send_inline_many([b"ab" * n, b"c"], 0, 64)
        elif k == 9:
            r.write_slot_ref(0, 0, n, 1)
        elif k == 10:
            assert len(r.indices) == 3 and len(r.waiting) == 2
        elif k == 11:
            r.claim_peer_waiting(bool(n & 1))
        elif k == 12:
            r.send_rows(b"r" * 8 * (n + 1), 0, 8)
        else:
            r.release(4 * n)


# -- 3. a whole segment attached from an fd -----------------------------------------------------

_TEMPLATE: Optional[bytes] = None
SEGMENT_CONFIG = dict(max_guests=3, bipbuf_capacity=256, inline_threshold=16, size_classes=((64, 4), (128, 2, 3)))


def segment_template() -> bytes:
    """A small segment in use: frames of every kind in three rings, slots held, a grown extent,
    a journal entry. Inputs patch it (or replace it) before it is attached."""
    global _TEMPLATE
    if _TEMPLATE is not None:
        return _TEMPLATE
    seg = Segment.create(L.SegmentConfig(**SEGMENT_CONFIG))  # type: ignore[arg-type]
    try:
        peers = seg.peers
        p1, p2 = peers.attach(), peers.attach()
        peers.reserve()  # peer 3: what a bootstrap response hands to a guest
        seg.grow_class(1)
        host1 = Link(seg, p1, None, HOST)
        g1 = Link(seg, p1, None, GUEST)
        g2 = Link(seg, p2, None, GUEST)
        host1.send(b"hello")
        host1.send(b"s" * 40)  # a slot
        g1.send(b"to host")
        g1.send(b"t" * 100)  # class 1
        g1.send(b"u" * 110)
        g2.send(b"v" * 50)
        g2.send(b"w")
        slot = seg.alloc(60, p2)  # held by guest 2
        # a journal entry: guest 2 died between the two halves of a free
        j = seg.layout.peer_entry_offset(p2) + L.PEER_POOL_OP
        seg.region.store_u64(j, (L.POOL_OP_FREE << 56) | (0 << 32) | slot[2])
        seg.region.store_u32(j + 8, slot[3])
        for link in (host1, g1, g2):
            link._closed = True  # keep the rings as they are: no goodbye, no release
        with open(f"/proc/self/fd/{seg.fd}", "rb") as f:
            _TEMPLATE = f.read()
    finally:
        seg.close()
    return _TEMPLATE


def _patched(inp: Input, image: bytes) -> bytes:
    """Mode byte: bit 7 replaces the image's prefix with the input; else (u16 offset, u8 len,
    bytes) patches. Bit 6 then truncates the file to a u16 * 8 bytes. (Bit 5: a read-only attach.)"""
    mode = inp.u8()
    out = bytearray(image)
    if mode & 0x80:
        body = inp.rest()
        out[: len(body)] = body
    else:
        while inp.left >= 3:
            off = inp.u16() % len(out)
            n = inp.u8() % 17
            chunk = inp.take(n)
            out[off : off + len(chunk)] = chunk
    if mode & 0x40:
        cut = int.from_bytes(out[-2:], "little") * 8
        del out[cut:]
    return bytes(out)


@target
def segment(data: bytes) -> None:
    """Segment.attach over bytes another process wrote (header, classes, extents, peer table,
    rings, slot metadata, journals), then what a host and a guest do with them: receive on every
    ring, allocate and free slots, and the host's recovery of a dead guest."""
    image = _patched(Input(data), segment_template())
    read_only = bool(data[:1]) and bool(data[0] & 0x20)
    fd = _memfd(image)
    try:
        seg = Segment.attach(fd, writable=not read_only)
    finally:
        os.close(fd)
    try:
        if read_only:
            monitor.sample(seg)  # `shmhub inspect` and `top`: a read-only attach, then a look
        else:
            _exercise(seg)
    finally:
        seg.close()


def _exercise(seg: Segment) -> None:
    n = seg.config.max_guests
    links = []
    monitor.sample(seg)  # what `shmhub inspect` reads
    try:
        for pid in range(1, min(n, 2) + 1):
            seg.peers.state(pid)
            seg.peers.epoch(pid)
            seg.peers.mmap_counters(pid)
            for side in (HOST, GUEST):
                links.append(Link(seg, pid, None, side))
        for link in links:
            for _ in range(4):
                try:
                    msg = link.try_recv()
                except ShmhubError:
                    break
                if msg is None:
                    break
                with msg:
                    bytes(msg)
        for size in (1, 60, 100, 200):
            try:
                ref = seg.alloc(size, 1)
            except ShmhubError:
                continue
            if ref is None:
                continue
            seg.pool.free(*ref[:4], by=1)
        _recover(seg, 1)
    finally:
        for link in links:
            link._closed = True


def _recover(seg: Segment, pid: int) -> None:
    """The steps of Host._recover on a guest whose structures came from the input (no clock)."""
    ring, pool = seg.h2g(pid), seg.pool
    for _ in range(ring.capacity // L.FRAME_HEADER_SIZE + 1):
        frame = ring.read_frame()
        if frame is None:
            break
        if frame[0] == L.KIND_SLOT_REF:
            try:
                pool.free_if_current(frame[2], frame[3], frame[4], frame[5])
            except ShmhubError:
                pass
        ring.release(frame[1])
    ring.reset()
    seg.g2h(pid).reset()
    seg.refresh_extents()
    pool.recover_pool_op(pid)
    pool.reclaim(pid)
    seg.peers.reset(pid)


# -- 4. the mmap tier's attach datagram ---------------------------------------------------------

_ctrl: Optional[List[socket.socket]] = None


def _ctrl_pair() -> List[socket.socket]:
    global _ctrl
    if _ctrl is None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        a.setblocking(False)
        b.setblocking(False)
        _ctrl = [a, b]
    return _ctrl


def _drain_raw(sock: socket.socket) -> None:
    """Empty the socket (closing any fd) so one input never leaks into the next."""
    while True:
        try:
            _, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for fd in array.array("i", body[: len(body) - len(body) % 4]):
                    os.close(fd)


_FD_KINDS = 8


def _make_fd(kind: int, content: bytes, size: int) -> int:
    """An fd of one of the kinds a hostile peer could pass: sealed/unsealed memfd, /dev/null, pipe,
    sockets, a read-only memfd."""
    kind %= _FD_KINDS
    if kind in (0, 1):
        fd = _memfd(content, size, seal=True)
        if kind == 0:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd
    if kind == 2:
        return _memfd(content, size)
    if kind == 3:
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    if kind == 4:
        r, w = os.pipe2(os.O_CLOEXEC)
        os.close(w)
        return r
    if kind == 5:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.close()
        return a.detach()
    if kind == 6:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        b.close()
        return a.detach()
    fd = _memfd(content, size)
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(fd)


def _send_with_fds(sock: socket.socket, data: bytes, fds: List[int]) -> None:
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        sock.sendmsg([data], anc)
    finally:
        for fd in fds:
            os.close(fd)


@target
def mmap_attach(data: bytes) -> None:
    """MapReceiver over attach datagrams (u32 map_id, u32 generation, u64 length + fds) and the
    mapping each fd carries, then a ref resolved against what was attached."""
    inp = Input(data)
    a, b = _ctrl_pair()
    _drain_raw(b)
    rx = MapReceiver(b)
    try:
        for _ in range(inp.u8() % 3 + 1):
            dlen = inp.u8() % 24
            dgram = inp.take(dlen)
            nfds = inp.u8()
            kind, pages = nfds >> 4, inp.u8() % 4
            header = inp.take(24)
            fds = [_make_fd(kind + i, header, pages * 4096) for i in range(nfds & 3)]
            if not dgram and not fds:
                dgram = b"\0"  # an empty datagram reads as the peer closing: covered once below
            _send_with_fds(a, dgram, fds)
        try:
            rx._drain()
        finally:
            _drain_raw(b)
        m = rx.resolve(inp.u32(), inp.u32(), inp.u64(), inp.u32(), grace_s=0)
        with memoryview(m.region) as mv:
            assert mv.nbytes == m.size
    finally:
        rx.close()


# -- 5. bootstrap: the request (host side), the response and its fds (guest side) ---------------


@target
def bootstrap_msgs(data: bytes) -> None:
    """decode_request on the host; on the guest decode_response over the data, flags and control
    messages of a recvmsg (with real fds: every one must be closed or handed over), then the
    guest's adoption of the fds a success response carried."""
    inp = Input(data)
    sel = inp.u8()
    if sel & 1:
        bootstrap.request_incomplete(inp.data[1:])
        bootstrap.decode_request(inp.data[1:])
        return
    flags = 0
    if sel & 2:
        flags |= socket.MSG_CTRUNC
    if sel & 4:
        flags |= socket.MSG_TRUNC
    anc = []
    opened: List[int] = []
    foreign: List[int] = []  # fds in control messages decode_response must not touch: ours to close
    for _ in range((sel >> 3) & 3):
        spec = inp.u8()
        nfds = spec & 7
        fds = [_make_fd(inp.u8(), b"", 0) for _ in range(nfds)]
        opened += fds
        body = array.array("i", fds).tobytes()
        if spec & 0x08:
            body = body[: len(body) - 2]  # a truncated cmsg
        level = socket.SOL_SOCKET if not spec & 0x10 else socket.IPPROTO_IP
        kind = socket.SCM_RIGHTS if not spec & 0x20 else socket.SCM_CREDENTIALS
        if not (level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS):
            foreign += fds
        elif spec & 0x08:
            foreign.append(fds[-1]) if fds else None  # its number is cut: the kernel would not pass it
        anc.append((level, kind, body))
    payload_fd_kinds = inp.take(4)
    body = inp.rest()
    resp = None
    try:
        resp = bootstrap.decode_response(body, anc, flags)
    finally:
        for fd in foreign:
            _close_quiet(fd)
        if resp is None:
            _check_closed(opened, keep=())
    if not resp.ok:
        _check_closed(opened, keep=())
        return
    # Replace the fds by the kinds the input names (the wire's fds are placeholders here): a
    # doorbell, the segment (the template: a real one), the control socket twice.
    resp.close()
    fds = []
    for i, k in enumerate(payload_fd_kinds.ljust(4, b"\0")):
        if i == 1 and k % 2 == 0:
            fds.append(_memfd(segment_template()))
        else:
            fds.append(_make_fd(k, b"", 4096))
    if payload_fd_kinds[2:3] == payload_fd_kinds[3:4] and fds[2] >= 0:
        os.close(fds[3])
        fds[3] = os.dup(fds[2])
    resp = bootstrap.Response(resp.status, resp.peer_id, resp.payload, tuple(fds))
    link = guest.adopt_response(resp, 0)
    link.close()


def _close_quiet(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _check_closed(fds: List[int], keep: tuple) -> None:
    for fd in fds:
        if fd in keep:
            continue
        try:
            os.fstat(fd)
        except OSError:
            continue
        os.close(fd)
        raise AssertionError(f"decode_response left fd {fd} open")


# -- 6. RPC frames ------------------------------------------------------------------------------


@target
def rpc(data: bytes) -> None:
    """FrameAssembler over a stream of messages (u16 length prefixes), then what the serving and
    calling ends read from a complete frame: the payload, the out-of-band views, an ERROR payload."""
    from shmhub.rpc._codec import BytesCodec
    from shmhub.rpc._protocol import CallTable, FrameAssembler, ServingTable, decode_error
    from shmhub.rpc._wire import Kind

    inp = Input(data)
    asm = FrameAssembler(max_frame=1 << 16)
    codec = BytesCodec()
    calls: CallTable[int] = CallTable()
    for i in range(3):
        calls.start(i, deadline_ns=i)
    serving: ServingTable[int] = ServingTable()
    while inp.left:
        msg = inp.take(inp.u16() % 2048)
        inc = asm.feed(msg)
        if inc is None:
            continue
        views = inc.views()
        payload = inc.payload()
        h = inc.frame
        # the connection's bookkeeping (_conn.Connection._dispatch) on what the peer sent
        if h.kind == Kind.REQUEST:
            serving.request(h.call_id, 0)
        elif h.kind in (Kind.CANCEL, Kind.CREDIT):
            if serving.control(h.kind, h.call_id) is not None and h.kind == Kind.CANCEL:
                serving.done(h.call_id)
        elif calls.lookup_response(h.call_id) is not None and h.kind != Kind.ITEM:
            calls.finish(h.call_id)
        calls.next_deadline()
        if h.kind == Kind.ERROR:
            decode_error(payload, codec)
        else:
            codec.decode_call(payload, views)
        for v in views:
            bytes(v)
        inc.release()
    asm.reset()


# -- 7. HTTP metadata ---------------------------------------------------------------------------


@target
def http_meta(data: bytes) -> None:
    """The HTTP gateway's request and response metadata decoders; a decoded request re-encodes
    to the same bytes."""
    from shmhub.http._meta import decode_request, decode_response, encode_request, encode_response

    if not data:
        return
    body = data[1:]
    if data[0] & 1:
        meta = decode_response(body)
        assert decode_response(encode_response(meta)) == meta
    else:
        req = decode_request(body)
        assert decode_request(encode_request(req)) == req


# -- 8. the executor's fd socket ----------------------------------------------------------------


@target
def executor_fds(data: bytes) -> None:
    """A worker's WorkerRegions.fetch over datagrams (u8 kind, u64 region id, maybe an fd), then
    an array reference into what was mapped (the numbers of a pickled reference)."""
    from shmhub.executor import _shared

    inp = Input(data)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    regions = _shared.WorkerRegions(b)
    try:
        for _ in range(inp.u8() % 3 + 1):
            dgram = inp.take(inp.u8() % 12)
            spec = inp.u8()
            fds = [_make_fd(spec >> 2, b"\x01" * 8, (spec & 3) * 4096) for _ in range(spec & 1)]
            _send_with_fds(a, dgram, fds)
        a.close()
        rid = inp.u8() % 4
        saved = _shared.ATTACH_TIMEOUT
        _shared.ATTACH_TIMEOUT = 0.0001  # nothing else will come: the socket is closed
        try:
            regions.fetch(rid)
        finally:
            _shared.ATTACH_TIMEOUT = saved
        ndim = inp.u8() % 3
        shape = tuple(inp.u8() for _ in range(ndim))
        strides = tuple(struct.unpack("<b", inp.take(1).ljust(1, b"\0"))[0] for _ in range(ndim))
        dtype = inp.take(inp.u8() % 6).decode("ascii", "replace") or "u1"
        arr = _shared._table.array(rid, inp.u16(), shape, dtype, strides)
        arr.sum() if arr.dtype.kind in "iufb" else None
        del arr
    finally:
        a.close()
        b.setblocking(False)
        _drain_raw(b)
        with _shared._table.lock:
            for rid in regions.maps:
                _shared._table.by_id.pop(rid, None)
        regions.maps.clear()
        b.close()


# -- 9. an array payload (shmhub.codec) ---------------------------------------------------------


@target
def array_payload(data: bytes) -> None:
    """decode_array over a received payload (the header's offset, dtype string and shape come
    from the peer); a decoded array is read whole, so it must lie inside the payload."""
    from shmhub._native import Message
    from shmhub.codec import decode_array

    arr = decode_array(Message(data, 0, len(data), "inline"))
    assert arr.nbytes <= len(data)
    arr.tobytes()


# -- 10. a remote link's control message (shmhub.remote) ----------------------------------------


@target
def remote_wire(data: bytes) -> None:
    """The remote link's control-message decoder (a peer across the network wrote these bytes);
    a decoded message re-encodes to the same bytes."""
    from shmhub.remote._wire import decode, encode

    c = decode(data)
    assert encode(c) == data
