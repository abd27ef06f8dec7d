"""The mmap tier (DECISIONS 11): payloads above the largest slot travel in memfd mappings passed
once per mapping over a per-peer SOCK_DGRAM control socket (16-byte body + one fd, SCM_RIGHTS).

Unlike upstream (trap 41) every mapping carries a lease count in its header (FEATURE_MMAP_LEASES):
the sender adds one per payload, the receiver subtracts one when it releases the payload. A mapping
whose leases are back to zero is reused; idle mappings are retired (flag in the header) and both
sides unmap them."""

from __future__ import annotations

import array
import fcntl
import errno
import os
import socket
import struct
import time
from typing import Dict, Iterable, List, Optional, Tuple

from . import layout as L
from . import _crash
from ._native import Region
from .errors import LinkCorrupted, LinkExhausted, PayloadTooLarge, PeerDead, ResourceExhausted

_ATTACH = struct.Struct("<IIQ")  # map_id, map_generation, mapping_length (format-v7 1.10)
assert _ATTACH.size == L.MMAP_ATTACH_SIZE
MIN_MAPPING = 1 << 20
MAX_MAPPING = 1 << 40
SEND_RETRIES = 2000  # trap 39: the control datagram may meet a full queue; retry, bounded
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)
GRACE_S = 2.0  # trap 38: a ref may overtake its attach message; wait this long before LinkCorrupted
_EXHAUSTED = (errno.ENOMEM, errno.EMFILE, errno.ENFILE)


class Mapping:
    """One memfd mapping of the sender or the receiver."""

    __slots__ = ("map_id", "generation", "size", "region", "last_used")

    def __init__(self, map_id: int, generation: int, size: int, region: Region) -> None:
        self.map_id, self.generation, self.size, self.region = map_id, generation, size, region
        self.last_used = time.monotonic()

    @property
    def leases(self) -> int:
        return self.region.load_u32(L.MAP_HDR_LEASES)

    @property
    def retired(self) -> bool:
        return self.region.load_u32(L.MAP_HDR_RETIRED) != 0

    def add_lease(self) -> None:
        self.region.fetch_add_u32(L.MAP_HDR_LEASES, 1)

    def drop_lease(self) -> None:
        self.region.fetch_add_u32(L.MAP_HDR_LEASES, 0xFFFFFFFF)  # -1, AcqRel


class MapSender:
    """Our outgoing mappings on one link."""

    def __init__(self, ctrl: socket.socket, *, max_mappings: int = 16, max_idle: int = 4, idle_s: float = 2.0) -> None:
        self.ctrl = ctrl
        self.max_mappings = max_mappings
        self.max_idle = max_idle
        self.idle_s = idle_s
        self.maps: List[Mapping] = []
        self.next_id = 1
        self.created = self.reused = self.retired = 0

    def acquire(self, n: int) -> Optional[Mapping]:
        """A mapping with room for n payload bytes and no outstanding lease, or None at the cap."""
        need = L.MAP_HEADER_SIZE + n
        best = None
        for m in self.maps:
            if m.size >= need and m.leases == 0 and (best is None or m.size < best.size):
                best = m
        if best is not None:
            self.reused += 1
            self.sweep(keep=best)  # idle mappings beyond max_idle or idle_s go, also when we reuse
            return best
        self.sweep(force=len(self.maps) >= self.max_mappings)
        if len(self.maps) >= self.max_mappings:
            return None
        return self._create(max(MIN_MAPPING, -(-need // MIN_MAPPING) * MIN_MAPPING))

    def _create(self, size: int) -> Mapping:
        try:
            fd = os.memfd_create("shmhub-map", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            if e.errno in _EXHAUSTED:
                raise ResourceExhausted(e.errno, f"cannot create a mapping for a large payload: {e.strerror}") from None
            raise
        region = None
        try:
            # Pages are allocated now and the mapping pre-faulted, so the first payload does not pay
            # a fault per page; the size is sealed so a receiver can never SIGBUS on a shrunk file.
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                raise PayloadTooLarge(f"cannot allocate a {size}-byte mapping for a large payload: {e.strerror}") from None
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            _crash.point(b"mmap.created")
            try:
                region = Region(fd, size, True, 0, True)
            except OSError as e:
                if e.errno in _EXHAUSTED:
                    raise ResourceExhausted(e.errno, f"cannot map a {size}-byte mapping for a large payload: {e.strerror}") from None
                raise
            m = Mapping(self.next_id, 1, size, region)
            region.write(L.MAP_HDR_MAGIC, L.MAP_MAGIC)
            region.store_u32(L.MAP_HDR_MAP_ID, m.map_id)
            region.store_u32(L.MAP_HDR_GENERATION, m.generation)
            self._send_attach(m, fd)
            _crash.point(b"mmap.sent")
        except BaseException:
            if region is not None:
                region.close()  # never announced (or the peer is gone): no one else maps it
            raise
        finally:
            os.close(fd)  # the mapping stays; the receiver has its own fd
        self.next_id = (self.next_id + 1) & 0xFFFFFFFF or 1
        self.maps.append(m)
        self.created += 1
        return m

    def _send_attach(self, m: Mapping, fd: int) -> None:
        body = _ATTACH.pack(m.map_id, m.generation, m.size)
        fds = array.array("i", [fd])
        for _ in range(SEND_RETRIES):
            try:
                self.ctrl.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                return
            except InterruptedError:
                continue
            except BlockingIOError:
                time.sleep(0.001)
            except OSError as e:
                if e.errno in _PEER_GONE:  # the peer closed its end (exited, died, closed the link)
                    raise PeerDead(f"mmap control peer is gone: {e.strerror}") from None
                raise LinkCorrupted(f"mmap control socket failed: {e.strerror}") from None
        raise LinkCorrupted("mmap control socket stayed full for 2 s")

    def sweep(self, force: bool = False, keep: Optional[Mapping] = None) -> None:
        """Retire idle mappings beyond max_idle or idle longer than idle_s (all idle ones if force);
        `keep` is about to be used and is not idle."""
        now = time.monotonic()
        idle = [m for m in self.maps if m is not keep and m.leases == 0]
        idle.sort(key=lambda m: m.last_used)
        excess = len(idle) - self.max_idle
        for i, m in enumerate(idle):
            if force or i < excess or now - m.last_used > self.idle_s:
                self._retire(m)

    def _retire(self, m: Mapping) -> None:
        m.region.store_u32(L.MAP_HDR_RETIRED, 1)
        self.maps.remove(m)
        m.region.close()
        self.retired += 1

    def returned(self, map_id: int, gen: int, offset: int, length: int) -> Mapping:
        """Our mapping that a return ref names (FEATURE_MMAP_RETURN), bounds-checked. The peer
        added a lease for it before committing the ref, so it is still ours and not reusable."""
        for m in tuple(self.maps):  # the receiving thread: the sending one may change the list meanwhile
            if m.map_id == map_id and m.generation == gen:
                if offset < L.MAP_HEADER_SIZE or offset + length > m.size:
                    raise LinkCorrupted(f"mmap return ref [{offset}, +{length}) outside mapping {map_id} of {m.size} bytes")
                if m.leases == 0:
                    raise LinkCorrupted(f"mmap return ref to mapping {map_id} without a lease")
                return m
        raise LinkCorrupted(f"mmap return ref names mapping {map_id}/{gen}, which is not ours")

    def close(self) -> None:
        for m in list(self.maps):
            self._retire(m)


def holding(maps: Iterable[Mapping], addr: int, n: int) -> Optional[Mapping]:
    """The mapping whose payload area holds [addr, addr + n) in this process, if any."""
    for m in maps:
        base = m.region.address
        if base and base + L.MAP_HEADER_SIZE <= addr and addr + n <= base + m.size:
            return m
    return None


class MapReceiver:
    """The peer's mappings we have been given, keyed by (map_id, generation)."""

    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.maps: Dict[Tuple[int, int], Mapping] = {}

    def _drain(self) -> None:
        """Take every pending attach datagram. Any malformed one is terminal (trap 37)."""
        while True:
            try:
                # MSG_CMSG_CLOEXEC: the fds arrive close-on-exec (trap 33), never inheritable for a moment.
                data, anc, flags, _ = self.ctrl.recvmsg(256, socket.CMSG_SPACE(4 * 4), socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except InterruptedError:
                continue
            except BlockingIOError:
                return
            except OSError as e:
                raise LinkCorrupted(f"mmap control socket failed: {e.strerror}") from None
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:usable]))
            _crash.point(b"mmap.received")
            try:
                if not data and not fds:
                    raise LinkCorrupted("mmap control peer closed")
                if flags & socket.MSG_CTRUNC and not fds and len(data) == L.MMAP_ATTACH_SIZE:
                    # The kernel drops a passed fd this process has no room for (EMFILE): the
                    # mapping, and every payload it will carry, is lost for good.
                    raise LinkExhausted(
                        errno.EMFILE,
                        "mmap attach: the mapping's fd was dropped on arrival; this process is out of file descriptors (raise RLIMIT_NOFILE)",
                    )
                if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) != L.MMAP_ATTACH_SIZE or len(fds) != 1:
                    raise LinkCorrupted(f"malformed mmap attach message: {len(data)} bytes, {len(fds)} fds, flags {flags:#x}")
                map_id, gen, length = _ATTACH.unpack(data)
                if not L.MAP_HEADER_SIZE < length <= MAX_MAPPING or (map_id, gen) in self.maps:
                    raise LinkCorrupted(f"bad mmap attach: map {map_id}/{gen} length {length}")
                try:
                    seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
                    if not seals & fcntl.F_SEAL_SHRINK:  # else the sender could shrink it under our reads (SIGBUS)
                        raise LinkCorrupted(f"mmap attach: map {map_id} is not sealed against shrinking")
                    if os.fstat(fds[0]).st_size < length:
                        raise LinkCorrupted(f"mmap attach: map {map_id} fd is smaller than its {length} bytes")
                    region = Region(fds[0], length, True)  # writable: the receiver drops leases
                    _crash.point(b"mmap.mapped")
                except OSError as e:
                    if e.errno in _EXHAUSTED:
                        raise LinkExhausted(e.errno, f"mmap attach: cannot map map {map_id}: {e.strerror}") from None
                    raise LinkCorrupted(f"mmap attach: cannot map map {map_id}: {e.strerror}") from None
                if (
                    region.read(L.MAP_HDR_MAGIC, 8) != L.MAP_MAGIC
                    or region.load_u32(L.MAP_HDR_MAP_ID) != map_id
                    or region.load_u32(L.MAP_HDR_GENERATION) != gen
                ):
                    region.close()
                    raise LinkCorrupted(f"mmap attach: map {map_id}/{gen} header does not match")
            finally:
                for fd in fds:
                    os.close(fd)  # mapped (or refused): the fd is no longer needed
            self.maps[(map_id, gen)] = Mapping(map_id, gen, length, region)
            self._sweep()

    def resolve(self, map_id: int, gen: int, offset: int, length: int, grace_s: float = GRACE_S) -> Mapping:
        """The mapping a ref names, bounds-checked; waits up to grace_s for its attach message."""
        m = self.maps.get((map_id, gen))
        deadline = None
        while m is None:
            self._drain()
            m = self.maps.get((map_id, gen))
            if m is not None:
                break
            deadline = deadline or time.monotonic() + grace_s
            if time.monotonic() > deadline:
                raise LinkCorrupted(f"mmap ref names unknown mapping {map_id}/{gen} (no attach within {grace_s} s)")
            time.sleep(0.001)
        if offset < L.MAP_HEADER_SIZE or offset + length > m.size:
            raise LinkCorrupted(f"mmap ref [{offset}, +{length}) outside mapping {map_id} of {m.size} bytes")
        self._sweep(keep=m)  # unmap what the sender retired, even when no new attach follows
        return m

    def _sweep(self, keep: Optional[Mapping] = None) -> None:
        for key, m in list(self.maps.items()):
            if m is not keep and m.retired and m.leases == 0:
                del self.maps[key]
                m.region.close()

    def close(self) -> None:
        for m in self.maps.values():
            m.region.close()
        self.maps.clear()


def socketpair() -> Tuple[socket.socket, socket.socket]:
    """A control socketpair (SOCK_DGRAM, close-on-exec): (host end, guest end)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
    return a, b


__all__ = ["MapSender", "MapReceiver", "Mapping", "socketpair"]
