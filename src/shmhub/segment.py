"""Creating, attaching and validating a v7 segment (format-v7 1.1-1.7, DECISIONS 1-3, 16)."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Optional, Union

from . import _crash
from . import layout as L
import threading

from ._native import RELAXED, NeedExtent, Region, Ring, SlotPool, fence, format_extent
from .errors import (
    BadMagic,
    ConfigError,
    ForeignSegment,
    InsufficientSharedMemory,
    SegmentCorrupted,
    SegmentError,
    UnsupportedVersion,
)
from .layout import Layout, SegmentConfig
from .peers import PeerTable
from .slots import open_pool

if TYPE_CHECKING:
    from ._native import SlotRefParts


def _space_check(fd: int, size: int, where: Optional[str], start: int = 0) -> None:
    """Reserve the segment's pages now so a full tmpfs fails here, not as SIGBUS later (DECISIONS 16).
    `where` is the directory of a named segment; a memfd has no filesystem limit but memory."""
    avail = None
    if where is not None:
        st = os.statvfs(where)
        avail = st.f_bavail * st.f_frsize
    where = where or "shared memory (memfd)"
    hint = (
        f"free space in {where} (remove stale segments with `python -m shmhub clean`, or enlarge it: "
        f"mount -o remount,size=... {where}) or reduce the segment (fewer/smaller size_classes, smaller "
        "bipbuf_capacity, fewer max_guests)"
    )
    if avail is not None and avail < size - start:
        raise InsufficientSharedMemory(errno.ENOSPC, f"the segment needs {size} bytes but {where} has only {avail} free; {hint}")
    try:
        os.posix_fallocate(fd, start, size - start)
    except OSError as e:
        if e.errno == errno.EFBIG:  # past RLIMIT_FSIZE (SIGXFSZ ignored), not a full filesystem
            raise InsufficientSharedMemory(e.errno, f"cannot reserve {size} bytes in {where}: {e.strerror} (the file size limit, ulimit -f)") from None
        if e.errno in (errno.ENOSPC, errno.ENOMEM):
            raise InsufficientSharedMemory(e.errno, f"cannot reserve {size} bytes in {where}: {e.strerror}; {hint}") from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, size)


def _check_owner(path: str, st: os.stat_result, allow_uids: Iterable[int]) -> None:
    """Refuse a segment another user controls: its owner (or anyone, if world-writable) can write
    frames into our rings, and an RPC peer with the pickle codec runs the code they choose. fstat of
    the opened fd, not stat of the path, so the file checked is the file mapped (no TOCTOU)."""
    if isinstance(allow_uids, (str, bytes, int)):
        raise TypeError(f"allow_uids must be an iterable of ints, got {allow_uids!r}")
    allowed = {os.geteuid(), *allow_uids}
    if st.st_uid not in allowed:
        raise ForeignSegment(
            f"segment {path} is owned by uid {st.st_uid}, not by this process (euid {os.geteuid()}); "
            f"attach with allow_uids=({st.st_uid},) if that user is trusted"
        )
    if st.st_mode & stat.S_IWOTH:
        raise ForeignSegment(f"segment {path} is writable by every user (mode {stat.S_IMODE(st.st_mode):04o}); `chmod o-w {path}` first")


_EXHAUSTED = (errno.ENOMEM, errno.EMFILE, errno.ENFILE)


def _map(fd: int, size: int, writable: bool, offset: int = 0, populate: bool = False) -> Region:
    """Region(...), with out-of-memory (an mmap refused under RLIMIT_AS or overcommit) typed."""
    try:
        return Region(fd, size, writable, offset, populate)
    except OSError as e:
        if e.errno in _EXHAUSTED:
            raise InsufficientSharedMemory(e.errno, f"cannot map {size} bytes of the segment at offset {offset}: {e.strerror}") from None
        raise


class Segment:
    """One mapped v7 segment: header, peer table, rings and slot pool."""

    fd: int
    path: Optional[str]
    config: SegmentConfig
    layout: Layout
    region: Region
    pool: SlotPool
    peers: PeerTable

    def __init__(self, fd: int, path: Optional[str], writable: bool, owner: bool) -> None:
        """Use Segment.create or Segment.attach."""
        self.fd = fd
        self.path = path
        self._owner = owner
        self._rings: Dict[int, Ring] = {}
        self._extents: List[Region] = []  # unmapped by close(), not left to the garbage collector
        self._closed = False
        self._grow_lock = threading.Lock()
        self.growths = 0
        self._grown_at: Dict[int, List[int]] = {}  # host: class -> file offsets of the extents it appended
        self.on_grow: Optional[Callable[[], None]] = None  # the host sets this to ring every guest after a growth
        try:
            size = os.fstat(fd).st_size
            if size < L.HEADER_SIZE:
                raise SegmentCorrupted(f"segment is truncated: {size} bytes, the header alone needs {L.HEADER_SIZE}")
            try:
                # The creator pre-faults the page tables: no minor fault on a slot's first use. A
                # guest does not: populating the whole segment cost each attach 1-3 ms (19 MiB by
                # default), most of a forkserver worker's start, while a guest touches only its
                # rings and the slots it uses. Extents added later are not populated either: growth
                # runs in-band (an event loop's step), and populating there would block it.
                self.region = _map(fd, size, writable, 0, writable and owner)
            except InsufficientSharedMemory:
                raise
            except OSError as e:
                raise SegmentError(f"cannot map the segment ({size} bytes, {'read-write' if writable else 'read-only'}): {e.strerror}") from e
            self._validate(size)
        except BaseException:
            if getattr(self, "region", None) is not None:
                self.region.close()
            os.close(fd)
            raise

    # -- creation and attach ----------------------------------------------------------------

    @classmethod
    def create(cls, config: Optional[SegmentConfig] = None, path: Optional[str] = None, *, features: int = L.KNOWN_FEATURES) -> "Segment":
        """Create a segment. With `path`, a 0600 file kept until unlink(); without it, anonymous (memfd).
        `features` selects our extensions (DECISIONS 4); 0 gives a plain upstream v7 segment."""
        config = config or SegmentConfig()
        if features & ~L.KNOWN_FEATURES:
            raise ConfigError(f"unknown feature bits {features & ~L.KNOWN_FEATURES:#x}")
        if not isinstance(config, SegmentConfig):
            raise ConfigError(f"config must be a SegmentConfig, got {type(config).__name__}")
        layout = Layout.compute(config.max_guests, config.bipbuf_capacity, config.size_classes)
        if path is None:
            fd = os.memfd_create("shmhub", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            where = None
        else:
            path = os.fspath(path)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                raise SegmentError(f"{path} already exists; pick another path or remove a stale one with `python -m shmhub clean {path}`") from None
            except OSError as e:
                raise SegmentError(f"cannot create segment file {path}: {e.strerror}") from e
            where = os.path.dirname(os.path.abspath(path))
        try:
            os.fchmod(fd, 0o600)
            if path is not None:
                # A live host holds this lock; `clean` treats an unlocked file as stale (DECISIONS 16).
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _space_check(fd, layout.total_size, where)
            if path is None:
                # Nobody can shrink it: a guest's ftruncate would kill every process touching the
                # lost pages with SIGBUS, the host included (docs/guides/security.md). Growth stays
                # possible; a named file cannot be sealed.
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            region = _map(fd, layout.total_size, True)
            try:
                _format(region, config, layout, features)
            finally:
                region.close()
        except BaseException:
            os.close(fd)
            if path is not None:
                os.unlink(path)
            raise
        try:
            return cls(fd, path, True, owner=True)  # closes fd on failure
        except BaseException:
            if path is not None:
                os.unlink(path)  # the second mapping can fail too (ENOMEM): leave no file behind
            raise

    @classmethod
    def attach(cls, path_or_fd: Union[str, os.PathLike[str], int], *, writable: bool = True, allow_uids: Iterable[int] = ()) -> "Segment":
        """Map an existing segment from a path or an fd (the fd is duplicated) and validate it.
        A path opened writable must be owned by our euid or a uid in allow_uids, and not be writable
        by every user (ForeignSegment); an fd was handed to us by its owner and is not checked."""
        if isinstance(path_or_fd, int):
            try:
                fd = os.dup(path_or_fd)
            except OSError as e:
                if e.errno in _EXHAUSTED:
                    raise InsufficientSharedMemory(e.errno, f"cannot duplicate the segment fd {path_or_fd}: {e.strerror}") from None
                raise SegmentError(f"fd {path_or_fd} is not an open file: {e.strerror}") from None
            path = None
        else:
            path = os.fspath(path_or_fd)
            try:
                # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
                fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise SegmentError(f"cannot open segment {path}: {e.strerror}") from e
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SegmentError(f"{path_or_fd!r} is not a regular file or memfd")
        if path is not None and writable:
            try:
                _check_owner(path, st, allow_uids)
            except BaseException:
                os.close(fd)
                raise
        return cls(fd, path, writable, owner=False)

    # -- validation (DECISIONS 1-3, trap 12: everything is read from the segment) -------------

    def _validate(self, size: int) -> None:
        r = self.region
        magic = r.read(L.HDR_MAGIC, 8)
        if magic not in L.ACCEPTED_MAGICS:
            raise BadMagic(f"segment magic is {magic!r}; expected {L.MAGIC!r} or {L.MAGIC_TELEX!r}")
        u32: Callable[[int], int] = lambda off: r.load_u32(off, RELAXED)  # noqa: E731
        u64: Callable[[int], int] = lambda off: r.load_u64(off, RELAXED)  # noqa: E731
        version, header_size = u32(L.HDR_VERSION), u32(L.HDR_HEADER_SIZE)
        if version != L.VERSION:
            raise UnsupportedVersion(f"segment version is {version}; this library speaks version {L.VERSION}")
        if header_size != L.HEADER_SIZE:
            raise UnsupportedVersion(f"segment header_size is {header_size}; version 7 requires {L.HEADER_SIZE}")
        self.features = u32(L.HDR_FEATURES)
        if self.features & ~L.KNOWN_FEATURES:
            raise UnsupportedVersion(f"segment uses feature bits {self.features & ~L.KNOWN_FEATURES:#x} this library does not know")
        total, current = u64(L.HDR_TOTAL_SIZE), u64(L.HDR_CURRENT_SIZE)
        if total > size:
            raise SegmentCorrupted(f"header total_size {total} exceeds the file's {size} bytes (truncated segment)")
        if not total <= current <= size:
            raise SegmentCorrupted(f"current_size {current} must lie between total_size {total} and the file size {size}")
        max_guests, cap = u32(L.HDR_MAX_GUESTS), u32(L.HDR_BIPBUF_CAPACITY)
        if not 1 <= max_guests <= L.MAX_GUESTS_LIMIT:
            raise SegmentCorrupted(f"max_guests {max_guests} is outside 1..{L.MAX_GUESTS_LIMIT}")
        if cap < L.RING_ALIGN or cap % L.RING_ALIGN:
            raise SegmentCorrupted(f"bipbuf_capacity {cap} is not a positive multiple of {L.RING_ALIGN}")
        nclasses = u32(L.HDR_NUM_CLASSES)
        if not 1 <= nclasses <= L.MAX_CLASSES:
            raise SegmentCorrupted(f"num_var_slot_classes is {nclasses}; it must be 1..{L.MAX_CLASSES}")
        peer_table, pool = u64(L.HDR_PEER_TABLE_OFFSET), u64(L.HDR_VAR_POOL_OFFSET)
        if peer_table != L.PEER_TABLE_OFFSET:
            raise SegmentCorrupted(f"peer_table_offset is {peer_table}; v7 places it at {L.PEER_TABLE_OFFSET}")
        if pool % L.ALIGN or pool + nclasses * L.CLASS_HEADER_SIZE > total:
            raise SegmentCorrupted(f"var_pool_offset {pool} with {nclasses} class headers is misaligned or past total_size {total}")
        classes = []
        for c in range(nclasses):
            h = pool + c * L.CLASS_HEADER_SIZE
            slot_size, slot_count = u32(h + L.CLS_SLOT_SIZE), u32(h + L.CLS_SLOT_COUNT)
            if slot_size < L.SLOT_LEN_PREFIX or not 1 <= slot_count or slot_count * L.MAX_EXTENTS >= L.EMPTY_INDEX:
                raise SegmentCorrupted(f"slot class {c}: slot_size {slot_size}, slot_count {slot_count} out of range")
            max_ext = u32(h + L.CLS_MAX_EXTENTS) or 1 if self.features & L.FEATURE_EXTENTS else 1
            if not 1 <= max_ext <= L.MAX_EXTENTS:
                raise SegmentCorrupted(f"slot class {c}: max_extents {max_ext} is outside 1..{L.MAX_EXTENTS}")
            classes.append((slot_size, slot_count) if max_ext == 1 else (slot_size, slot_count, max_ext))
        try:
            lay = Layout.compute(max_guests, cap, classes)
        except ConfigError as e:
            raise SegmentCorrupted(f"the segment's classes describe an impossible layout: {e}") from None
        if lay.var_pool_offset != pool or lay.total_size != total:
            raise SegmentCorrupted(
                f"header offsets disagree with the v7 layout: var_pool_offset {pool} (expected {lay.var_pool_offset}), "
                f"total_size {total} (expected {lay.total_size})"
            )
        for peer_id in range(1, max_guests + 1):
            ro = u64(lay.peer_entry_offset(peer_id) + L.PEER_RING_OFFSET)
            if ro != lay.ring_offset(peer_id):
                raise SegmentCorrupted(f"peer {peer_id} ring_offset {ro} != {lay.ring_offset(peer_id)}")
            for off in (lay.g2h_offset(peer_id), lay.h2g_offset(peer_id)):
                if u32(off + L.RING_CAPACITY) != cap:
                    raise SegmentCorrupted(f"ring at {off} has capacity {u32(off + L.RING_CAPACITY)}, header says {cap}")
        self.layout = lay
        self.magic = magic
        self.config = _config_unchecked(
            max_guests=max_guests,
            bipbuf_capacity=cap,
            max_payload_size=u32(L.HDR_MAX_PAYLOAD_SIZE),
            inline_threshold=u32(L.HDR_INLINE_THRESHOLD),
            heartbeat_interval_ns=u64(L.HDR_HEARTBEAT_INTERVAL),
            size_classes=tuple(classes),
        )
        self.pool = open_pool(r, lay, bool(self.features & L.FEATURE_POOL_JOURNAL))
        self.pool.waiters = bool(self.features & L.FEATURE_POOL_WAITERS)
        self.peers = PeerTable(r, lay)
        self.refresh_extents()

    # -- growable classes (FEATURE_EXTENTS) ----------------------------------------------------
    # Each appended extent is mapped on its own at a page-aligned file offset, so the segment is
    # never remapped and no pointer or view handed out before a growth is invalidated (trap 14, 15).

    def _class_u32(self, c: int, field: int) -> int:
        return self.region.load_u32(self.layout.classes[c].header_offset + field)

    def extent_count(self, c: int) -> int:
        """Extents published for class c (1 = the v7 pool only)."""
        if not self.features & L.FEATURE_EXTENTS:
            return 1
        return self._class_u32(c, L.CLS_EXTENT_COUNT) or 1

    def max_extents(self, c: int) -> int:
        cls = self.config.size_classes[c]
        return cls[2] if len(cls) == 3 else 1

    def extent_offsets(self, c: int) -> List[int]:
        h = self.layout.classes[c].header_offset + L.CLS_EXTENT_OFFSETS
        return [self.region.load_u64(h + 8 * (e - 1)) for e in range(1, self.extent_count(c))]

    def refresh_extents(self) -> int:
        """Map every extent published since we last looked; returns how many were mapped."""
        if not self.features & L.FEATURE_EXTENTS:
            return 0
        mapped = 0
        with self._grow_lock:
            for c, cl in enumerate(self.layout.classes):
                count = self.extent_count(c)
                if count > self.max_extents(c):
                    raise SegmentCorrupted(f"class {c} publishes {count} extents, more than its maximum {self.max_extents(c)}")
                for e in range(self.pool.mapped_extents(c), count):
                    off = self.region.load_u64(cl.header_offset + L.CLS_EXTENT_OFFSETS + 8 * (e - 1))
                    data_off, size = L.extent_layout(cl.slot_size, cl.slot_count)
                    # trap 18: the size is published before the extent, and checked before use.
                    limit = min(self.current_size, os.fstat(self.fd).st_size)
                    if off % L.EXTENT_ALIGN or off < self.layout.total_size or off + size > limit:
                        raise SegmentCorrupted(f"class {c} extent {e} at {off} (+{size}) lies outside the segment ({limit} bytes)")
                    region = _map(self.fd, size, self.region.writable, off)
                    self._extents.append(region)
                    _crash.point(b"growth.mapping")
                    self.pool.add_extent(c, region, data_off)
                    _crash.point(b"growth.mapped")
                    mapped += 1
        return mapped

    def grow_class(self, c: int) -> bool:
        """Host: append one extent to class c. False when the class is at its maximum.
        Order: resize the file, store current_size, store the extent's offset and count, push its
        slots on the free list; the caller then rings every guest."""
        if not self.region.writable:
            # Checked first: the steps below resize the file and format the extent through a
            # mapping of their own, so a read-only attach over a writable fd would change the file.
            raise PermissionError("segment is attached read-only; it cannot grow")
        with self._grow_lock:
            e = self.extent_count(c)
            if e >= self.max_extents(c):
                return False
            cl = self.layout.classes[c]
            data_off, size = L.extent_layout(cl.slot_size, cl.slot_count)
            # After the file's end, not current_size: a guest can overwrite that word, and an
            # extent placed by it could land over the rings (docs/guides/security.md, trust model).
            file_size = os.fstat(self.fd).st_size
            off = L.align(file_size, L.EXTENT_ALIGN)
            region = None
            try:
                # Mapped before the file grows (nothing is touched until it covers the extent): a
                # mapping refused (ENOMEM) leaves the file as it was, which a sealed memfd needs,
                # as it cannot shrink back.
                region = _map(self.fd, size, True, off)
                _space_check(self.fd, off + size, os.path.dirname(os.path.abspath(self.path)) if self.path else None, start=off)
                format_extent(region, cl.slot_count, e * cl.slot_count)
            except BaseException:
                # Nothing is published yet: undo the resize, so no half-grown segment is left. A
                # guest's grow_request stays set: the host retries it (Host._serve_growth).
                if region is not None:
                    region.close()
                if os.fstat(self.fd).st_size != file_size:
                    try:
                        os.ftruncate(self.fd, file_size)
                    except PermissionError:
                        pass  # a sealed memfd cannot shrink: the tail stays unused (growth appends after it)
                raise
            r = self.region
            r.store_u64(L.HDR_CURRENT_SIZE, off + size)
            r.store_u64(cl.header_offset + L.CLS_EXTENT_OFFSETS + 8 * (e - 1), off)
            self._grown_at.setdefault(c, []).append(off)
            r.store_u32(cl.header_offset + L.CLS_EXTENT_COUNT, e + 1)
            self._extents.append(region)
            self.pool.add_extent(c, region, data_off)
            self.pool.publish_extent(c)
            r.store_u32(cl.header_offset + L.CLS_GROW_REQUEST, 0)
            self.growths += 1
        if self.on_grow is not None:
            self.on_grow()
        return True

    def restore_fixed(self) -> None:
        """Host: rewrite what only the host writes -- the fields fixed at creation, current_size and
        the extents it appended -- from its own record. A guest's stray write to them would otherwise
        make every later attach fail (recovery calls this)."""
        if not self.region.writable:
            raise PermissionError("segment is attached read-only")
        r = self.region
        with self._grow_lock:
            _write_fixed(r, self.config, self.layout, self.features)
            r.store_u64(L.HDR_CURRENT_SIZE, os.fstat(self.fd).st_size, RELAXED)
            if self.features & L.FEATURE_EXTENTS:
                for c, cl in enumerate(self.layout.classes):
                    grown = self._grown_at.get(c, [])
                    for e, off in enumerate(grown, 1):
                        r.store_u64(cl.header_offset + L.CLS_EXTENT_OFFSETS + 8 * (e - 1), off, RELAXED)
                    r.store_u32(cl.header_offset + L.CLS_EXTENT_COUNT, 1 + len(grown) if self.max_extents(c) > 1 else 0, RELAXED)
            fence()
            if r.read(L.HDR_MAGIC, 8) != self.magic:
                r.write(L.HDR_MAGIC, self.magic)

    def request_growth(self, size: int) -> bool:
        """Guest: ask the host to grow the smallest growable class that fits `size`; False if none can."""
        for c, cls in enumerate(self.config.size_classes):
            if cls[0] >= size and self.extent_count(c) < self.max_extents(c):
                off = self.layout.classes[c].header_offset + L.CLS_GROW_REQUEST
                if self.region.load_u32(off) == 0:
                    self.region.store_u32(off, 1)
                    _crash.point(b"growth.requested")
                    self.call_host()
                return True
        return False

    def call_host(self) -> None:
        """Wake the host's attention thread (FEATURE_POOL_WAITERS); without the bit it scans anyway."""
        if self.features & L.FEATURE_POOL_WAITERS:
            self.region.fetch_add_u32(L.HDR_ATTENTION, 1)
            self.region.futex_wake(L.HDR_ATTENTION)

    def grow_for(self, size: int) -> bool:
        """Host: grow the smallest growable class that fits `size`; False if none can."""
        for c, cls in enumerate(self.config.size_classes):
            if cls[0] >= size and self.grow_class(c):
                return True
        return False

    def growth_requests(self) -> List[int]:
        """Classes a guest asked to grow."""
        if not self.features & L.FEATURE_EXTENTS:
            return []
        return [c for c in range(len(self.layout.classes)) if self._class_u32(c, L.CLS_GROW_REQUEST)]

    def alloc(self, size: int, owner: int) -> Optional[SlotRefParts]:
        """pool.alloc, mapping extents published by the host when a free slot lives in one."""
        while True:
            try:
                return self.pool.alloc(size, owner)
            except NeedExtent as e:
                self._need(e)

    def take(self, c: int, e: int, s: int, gen: int, owner: int) -> int:
        """pool.take, mapping the slot's extent first if it is new to this process."""
        try:
            return self.pool.take(c, e, s, gen, owner)
        except NeedExtent as err:
            self._need(err)
            return self.pool.take(c, e, s, gen, owner)

    def _need(self, err: NeedExtent) -> None:
        c, e = err.args
        if self.refresh_extents() == 0 or self.pool.mapped_extents(c) <= e:
            raise SegmentCorrupted(f"slot class {c} extent {e} is referenced but was never published")

    # -- accessors ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.region.size

    @property
    def file_size(self) -> int:
        return os.fstat(self.fd).st_size

    @property
    def total_size(self) -> int:
        return self.layout.total_size

    @property
    def current_size(self) -> int:
        return self.region.load_u64(L.HDR_CURRENT_SIZE)

    @property
    def inline_threshold(self) -> int:
        """The effective inline limit (DECISIONS 5)."""
        return L.effective_inline_threshold(self.config.inline_threshold, self.config.bipbuf_capacity)

    @property
    def host_goodbye(self) -> bool:
        return self.region.load_u32(L.HDR_HOST_GOODBYE) != 0

    def say_goodbye(self) -> None:
        """Host: store host_goodbye = 1 (Release)."""
        self.region.store_u32(L.HDR_HOST_GOODBYE, 1)

    def g2h(self, peer_id: int) -> Ring:
        """The guest-to-host ring of a peer."""
        return self._ring(self.layout.g2h_offset(peer_id))

    def h2g(self, peer_id: int) -> Ring:
        """The host-to-guest ring of a peer."""
        return self._ring(self.layout.h2g_offset(peer_id))

    def _ring(self, off: int) -> Ring:
        ring = self._rings.get(off)
        if ring is None:
            ring = self._rings[off] = Ring(self.region, off)
            ring.counting = bool(self.features & L.FEATURE_RING_COUNTERS)
        return ring

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap (once no view is exported) and close the fd. A named file stays until unlink()."""
        if self._closed:
            return
        self._closed = True
        self._rings.clear()
        self.region.close()
        for region in self._extents:  # a view still exported keeps its mapping until released
            region.close()
        os.close(self.fd)

    def unlink(self) -> None:
        """Remove the segment's file (named segments created by this process)."""
        if self.path is not None and self._owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owner:
            self.unlink()
        self.close()

    def __repr__(self) -> str:
        where = self.path or f"fd {self.fd}"
        return f"<Segment {where} size={self.region.size} guests={self.config.max_guests}{' closed' if self._closed else ''}>"


def _config_unchecked(**fields: object) -> SegmentConfig:
    """A SegmentConfig read back from a segment: validated by _validate, not by our stricter creation rules."""
    cfg = object.__new__(SegmentConfig)
    for k, v in fields.items():
        object.__setattr__(cfg, k, v)
    return cfg


def _write_fixed(r: Region, config: SegmentConfig, layout: Layout, features: int) -> None:
    """The fields nothing changes after creation, which every attach validates: header, class
    sizes, peer ring offsets, ring capacities."""
    r.store_u32(L.HDR_VERSION, L.VERSION, RELAXED)
    r.store_u32(L.HDR_HEADER_SIZE, L.HEADER_SIZE, RELAXED)
    r.store_u64(L.HDR_TOTAL_SIZE, layout.total_size, RELAXED)
    r.store_u32(L.HDR_MAX_PAYLOAD_SIZE, config.max_payload_size, RELAXED)
    r.store_u32(L.HDR_INLINE_THRESHOLD, config.inline_threshold, RELAXED)
    r.store_u32(L.HDR_MAX_GUESTS, config.max_guests, RELAXED)
    r.store_u32(L.HDR_BIPBUF_CAPACITY, config.bipbuf_capacity, RELAXED)
    r.store_u64(L.HDR_PEER_TABLE_OFFSET, layout.peer_table_offset, RELAXED)
    r.store_u64(L.HDR_VAR_POOL_OFFSET, layout.var_pool_offset, RELAXED)
    r.store_u64(L.HDR_HEARTBEAT_INTERVAL, config.heartbeat_interval_ns, RELAXED)
    r.store_u32(L.HDR_NUM_CLASSES, len(config.size_classes), RELAXED)
    r.store_u32(L.HDR_FEATURES, features, RELAXED)
    for peer_id in range(1, config.max_guests + 1):
        r.store_u64(layout.peer_entry_offset(peer_id) + L.PEER_RING_OFFSET, layout.ring_offset(peer_id), RELAXED)
        for off in (layout.g2h_offset(peer_id), layout.h2g_offset(peer_id)):
            r.store_u32(off + L.RING_CAPACITY, config.bipbuf_capacity, RELAXED)
    for c, cls in zip(layout.classes, config.size_classes):
        r.store_u32(c.header_offset + L.CLS_SLOT_SIZE, cls[0], RELAXED)
        r.store_u32(c.header_offset + L.CLS_SLOT_COUNT, cls[1], RELAXED)
        if features & L.FEATURE_EXTENTS:
            r.store_u32(c.header_offset + L.CLS_MAX_EXTENTS, cls[2] if len(cls) == 3 and cls[2] > 1 else 0, RELAXED)


def _format(r: Region, config: SegmentConfig, layout: Layout, features: int) -> None:
    """Write a fresh segment. The magic goes last, after a Release fence, so an attacher by path
    never sees a valid magic over half-written contents."""
    _write_fixed(r, config, layout, features)
    r.store_u32(L.HDR_HOST_GOODBYE, 0, RELAXED)
    r.store_u64(L.HDR_CURRENT_SIZE, layout.total_size, RELAXED)
    open_pool(r, layout).format()
    for c, cls in zip(layout.classes, config.size_classes):
        if len(cls) == 3 and cls[2] > 1 and features & L.FEATURE_EXTENTS:
            r.store_u32(c.header_offset + L.CLS_EXTENT_COUNT, 1, RELAXED)
    fence()
    r.write(L.HDR_MAGIC, L.MAGIC)
