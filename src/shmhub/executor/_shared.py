"""Arrays in shared memory that reach every worker by reference (Executor.empty / zeros).

Each array lives in a memfd mapping of its own (a "region"). A task that pickles an array lying
in a region -- the array itself or any view of it -- sends (region, offset, shape, dtype, strides)
instead of the data; the region's fd goes once to each worker that needs it, over the worker's fd
socket (SCM_RIGHTS), before the frame that names it. The worker maps it and builds the same view;
a worker's result that is a view of a region comes back the same way.

A region lives as long as the mmap object its arrays are built on: when the last array is gone the
executor closes the fd and tells the workers to unmap it (they do so at their next attach)."""

from __future__ import annotations

import itertools
import mmap
import os
import pickle
import socket
import struct
import threading
import weakref
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import ShmhubError
from ..rpc import PickleCodec

__all__ = ["Regions", "TaskCodec", "WorkerRegions", "fd_socketpair"]

_MSG = struct.Struct("<BQ")  # kind, region id; an ATTACH datagram carries the fd
ATTACH, DROP = 1, 2
ATTACH_TIMEOUT = 5.0  # the fd is sent before the frame naming it: a wait this long means a bug
_ids = itertools.count(1)


def fd_socketpair() -> Tuple[socket.socket, socket.socket]:
    """(executor end, worker end) of a worker's fd socket."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return a, b


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # optional extra
        raise ImportError("shared arrays need numpy: pip install 'shmhub[numpy]'") from None
    return numpy


class _Region:
    __slots__ = ("rid", "fd", "size", "start", "mm", "__weakref__")

    def __init__(self, rid: int, fd: int, size: int, start: int, mm: "weakref.ref[mmap.mmap]") -> None:
        self.rid, self.fd, self.size, self.start, self.mm = rid, fd, size, start, mm


class _Table:
    """Regions of this process by id and by address."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_id: Dict[int, _Region] = {}

    def find(self, addr: int, nbytes: int) -> Optional[_Region]:
        with self.lock:
            for r in self.by_id.values():
                if r.start <= addr and addr + nbytes <= r.start + r.size:
                    return r
        return None

    def array(self, rid: int, offset: int, shape: Tuple[int, ...], dtype: str, strides: Tuple[int, ...]) -> Any:
        np = _numpy()
        with self.lock:
            r = self.by_id.get(rid)
            mm = r.mm() if r is not None else None
        if r is None or mm is None:
            raise ShmhubError(f"shared array region {rid} is unknown here (freed by the executor?)")
        try:  # numpy checks that the view lies inside the mapping (the numbers come from a peer)
            return np.ndarray(shape, dtype=dtype, buffer=mm, offset=offset, strides=strides)
        except Exception as e:  # TypeError, ValueError; numpy's dtype parser also raises SyntaxError
            raise ShmhubError(f"bad reference into shared array region {rid}: {type(e).__name__}: {e}") from None


def _extent(a: Any) -> Tuple[int, int]:
    """[lowest, highest) byte address an array touches."""
    addr = a.__array_interface__["data"][0]
    if a.size == 0:
        return addr, addr
    lo = hi = addr
    for n, st in zip(a.shape, a.strides):
        if st >= 0:
            hi += (n - 1) * st
        else:
            lo += (n - 1) * st
    return lo, hi + a.itemsize


_table = _Table()  # one per process: the executor's regions, or the worker's mappings
_fetch: Optional[Callable[[int], None]] = None  # worker: receive fds until region rid is mapped


def _attach(rid: int, offset: int, shape: Tuple[int, ...], dtype: str, strides: Tuple[int, ...]) -> Any:
    """Unpickle a region reference (host and worker alike)."""
    if rid not in _table.by_id and _fetch is not None:
        _fetch(rid)
    return _table.array(rid, offset, shape, dtype, strides)


def _reference(obj: Any) -> Optional[Tuple[Any, ...]]:
    """The region reference of an ndarray lying in a region of this process, else None."""
    if not _table.by_id or type(obj).__module__ != "numpy":
        return None
    np = _numpy()
    if not isinstance(obj, np.ndarray) or obj.dtype.hasobject:
        return None
    lo, hi = _extent(obj)
    r = _table.find(lo, hi - lo)
    if r is None:
        return None
    addr = obj.__array_interface__["data"][0]
    return r.rid, addr - r.start, obj.shape, obj.dtype.str, obj.strides


class Regions:
    """The executor's side: allocates regions and sends their fds to workers."""

    def __init__(self) -> None:
        self._finalizers: "List[weakref.finalize[Any, Any]]" = []
        self.on_drop: "Optional[weakref.WeakMethod[Callable[[int], None]]]" = None  # weak: readers hold us

    def empty(self, shape: Any, dtype: Any = "float64", fill_zero: bool = False) -> Any:
        np = _numpy()
        dt = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        size = max(nbytes, 1)
        fd = os.memfd_create("shmhub-array", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        start = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
        rid = next(_ids)
        region = _Region(rid, fd, size, start, weakref.ref(mm))
        with _table.lock:
            _table.by_id[rid] = region
        self._finalizers.append(weakref.finalize(mm, self._free, rid, fd))
        # memfd pages read as zeros: zeros() is empty() (no page is touched here)
        return np.ndarray(shape, dt, buffer=mm)

    def _free(self, rid: int, fd: int) -> None:
        with _table.lock:
            _table.by_id.pop(rid, None)
        os.close(fd)
        cb = self.on_drop() if self.on_drop is not None else None
        if cb is not None:
            cb(rid)

    def fd_of(self, rid: int) -> int:
        with _table.lock:
            return _table.by_id[rid].fd

    def close(self) -> None:
        """Forget every region (arrays still held stay valid: their mmaps live on)."""
        self.on_drop = None
        for f in self._finalizers:
            f()
        self._finalizers.clear()


class TaskCodec(PickleCodec):
    """pickle 5 with out-of-band buffers, plus region references for shared arrays. `sent` is the
    set of regions whose fd the peer already has; `send_fd(rid)` gives it one before the frame."""

    name = "pickle"

    def __init__(self, send_fd: Optional[Callable[[int], None]] = None) -> None:
        super().__init__()
        self.send_fd = send_fd
        self.sent: Set[int] = set()

        codec = self

        class _Pickler(pickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                ref = _reference(obj)
                if ref is None:
                    return NotImplemented
                rid = ref[0]
                if codec.send_fd is not None and rid not in codec.sent:
                    codec.send_fd(rid)  # the fd goes before the frame that names it
                    codec.sent.add(rid)
                return _attach, ref

        self._pickler = _Pickler

    def pickler_class(self) -> "Optional[type[pickle.Pickler]]":
        return self._pickler if _table.by_id else None  # no region: the fast path


def send_attach(sock: socket.socket, rid: int, fd: int) -> None:
    sock.sendmsg([_MSG.pack(ATTACH, rid)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])


def send_drop(sock: socket.socket, rid: int) -> None:
    try:
        sock.send(_MSG.pack(DROP, rid), socket.MSG_DONTWAIT)
    except OSError:
        pass  # the worker is gone, or its queue is full: it keeps an unused mapping until it exits


class WorkerRegions:
    """The worker's side: maps regions as their fds arrive, unmaps those the executor dropped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.maps: Dict[int, mmap.mmap] = {}

    def install(self) -> None:
        global _fetch
        _fetch = self.fetch

    def fetch(self, rid: int) -> None:
        self.sock.settimeout(ATTACH_TIMEOUT)
        while rid not in self.maps:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, _MSG.size, 1)
            except socket.timeout:
                raise ShmhubError(f"shared array region {rid}: its fd never came") from None
            if len(data) != _MSG.size:
                for fd in fds:
                    os.close(fd)
                raise ShmhubError("malformed message on the executor's fd socket")
            kind, r = _MSG.unpack(data)
            if kind == ATTACH and len(fds) == 1:
                self._map(r, fds[0])
            elif kind == DROP and not fds:
                self._drop(r)
            else:
                for fd in fds:
                    os.close(fd)
                raise ShmhubError("malformed message on the executor's fd socket")

    def _map(self, rid: int, fd: int) -> None:
        np = _numpy()
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size)
        except (OSError, ValueError) as e:  # not a mappable file, or an empty one (ValueError)
            raise ShmhubError(f"shared array region {rid}: cannot map the fd the executor sent: {e}") from None
        finally:
            os.close(fd)
        start = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
        self.maps[rid] = mm
        with _table.lock:
            _table.by_id[rid] = _Region(rid, -1, size, start, weakref.ref(mm))

    def _drop(self, rid: int) -> None:
        with _table.lock:
            _table.by_id.pop(rid, None)
        self.maps.pop(rid, None)  # unmapped once no array of the worker's uses it
