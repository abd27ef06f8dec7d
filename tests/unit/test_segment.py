"""Creating, attaching and validating segments (format-v7 1.1-1.3, 1.7; DECISIONS 1-3, 16;
traps 11, 12, 23)."""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from shmhub import Segment, SegmentConfig
from shmhub import layout as L
from shmhub._native import Region
from shmhub.errors import (
    BadMagic,
    ConfigError,
    InsufficientSharedMemory,
    SegmentCorrupted,
    SegmentError,
    ShmhubError,
    UnsupportedVersion,
)
from shmhub.layout import Layout

SMALL = SegmentConfig(max_guests=2, bipbuf_capacity=64, size_classes=((64, 4), (256, 2)))
# Deliberately unlike the defaults: a guest that assumed any default would get it wrong (trap 12).
ODD = SegmentConfig(
    max_guests=3,
    bipbuf_capacity=192,
    max_payload_size=777_777,
    inline_threshold=100,
    heartbeat_interval_ns=123_456_789,
    size_classes=((192, 5), (320, 3), (4096, 1)),
)


def fd_target(fd):
    return os.readlink(f"/proc/self/fd/{fd}")


# --- create ----------------------------------------------------------------------------------


def test_create_anonymous():
    with Segment.create(SMALL) as seg:
        assert seg.path is None
        assert fd_target(seg.fd).startswith("/memfd:")
        assert fcntl.fcntl(seg.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # DECISIONS 12
        lay = Layout.compute(SMALL.max_guests, SMALL.bipbuf_capacity, SMALL.size_classes)
        assert seg.layout == lay
        assert seg.size == seg.total_size == seg.current_size == lay.total_size == os.fstat(seg.fd).st_size
        assert seg.config == SMALL
        assert seg.region.read(0, 8) == L.MAGIC == b"ROAMHUB\x07"  # DECISIONS 1
        assert seg.magic == L.MAGIC
        assert seg.region.load_u32(L.HDR_VERSION) == 7
        assert seg.region.load_u32(L.HDR_HEADER_SIZE) == 128
        assert seg.region.load_u32(L.HDR_NUM_CLASSES) == 2
        # DECISIONS 4: the first reserved u32 holds our extensions (all of them by default);
        # the rest of the reserved bytes stay zero
        assert seg.region.load_u32(L.HDR_FEATURES) == seg.features == L.KNOWN_FEATURES
        assert seg.region.read(L.HDR_FEATURES + 4, L.HDR_RESERVED_END - L.HDR_FEATURES - 4) == bytes(44)
        assert not seg.host_goodbye
        assert not seg.closed
    assert seg.closed


def test_create_default_config():
    with Segment.create() as seg:
        assert seg.config == SegmentConfig()


# --- features (DECISIONS 4, docs/extensions.md) ------------------------------------------------

# Class 1 may grow (FEATURE_EXTENTS); on a features=0 segment it is a plain v7 class.
SMALL_GROW = SegmentConfig(max_guests=2, bipbuf_capacity=64, size_classes=((64, 4), (256, 2, 3)))


def test_known_feature_bits():
    assert (
        L.KNOWN_FEATURES
        == (
            L.FEATURE_WAITER_FLAGS
            | L.FEATURE_MMAP_LEASES
            | L.FEATURE_EXTENTS
            | L.FEATURE_POOL_JOURNAL
            | L.FEATURE_POOL_WAITERS
            | L.FEATURE_RING_COUNTERS
            | L.FEATURE_MMAP_RETURN
        )
        == 0x7F
    )
    assert not (1 << 7) & L.KNOWN_FEATURES  # what the "unknown feature bit" cases below rely on


def test_create_features_zero_is_plain_v7(shm_path):
    # features=0 writes an upstream v7 segment: every reserved and padding byte is zero
    with Segment.create(SMALL_GROW, path=shm_path, features=0) as seg:
        assert seg.features == 0
        assert seg.region.read(L.HDR_FEATURES, L.HDR_RESERVED_END - L.HDR_FEATURES) == bytes(48)
        for cl in seg.layout.classes:
            assert seg.region.read(cl.header_offset + L.CLS_EXTENT_COUNT, L.CLASS_HEADER_SIZE - L.CLS_EXTENT_COUNT) == bytes(48)
        # the growable class reads back as an ordinary one and does not grow
        assert seg.config.size_classes == ((64, 4), (256, 2))
        assert seg.extent_count(1) == seg.max_extents(1) == 1
        size = seg.file_size
        assert seg.grow_class(1) is False and seg.grow_for(100) is False
        assert seg.file_size == seg.current_size == size == seg.total_size
        with Segment.attach(shm_path) as guest:
            assert guest.features == 0 and guest.config == seg.config


def test_create_with_extents_writes_class_fields():
    with Segment.create(SMALL_GROW) as seg:
        assert seg.config == SMALL_GROW
        h0, h1 = (cl.header_offset for cl in seg.layout.classes)
        assert seg.region.read(h0 + L.CLS_EXTENT_COUNT, L.CLASS_HEADER_SIZE - L.CLS_EXTENT_COUNT) == bytes(48)
        assert seg.region.load_u32(h1 + L.CLS_EXTENT_COUNT) == 1
        assert seg.region.load_u32(h1 + L.CLS_MAX_EXTENTS) == 3
        assert seg.region.read(h1 + L.CLS_EXTENT_OFFSETS, L.CLASS_HEADER_SIZE - L.CLS_EXTENT_OFFSETS) == bytes(40)


@pytest.mark.parametrize("features", [1 << 7, 1 << 31, L.KNOWN_FEATURES | 1 << 7])
def test_create_rejects_unknown_feature_bits(shm_path, features):
    with pytest.raises(ConfigError):
        Segment.create(SMALL, path=shm_path, features=features)
    assert not os.path.exists(shm_path)


@pytest.mark.parametrize("features", [0, L.FEATURE_WAITER_FLAGS, L.FEATURE_MMAP_LEASES, L.FEATURE_EXTENTS, L.FEATURE_POOL_JOURNAL, L.KNOWN_FEATURES])
def test_known_feature_bits_attach(tmp_path, features):
    path = str(tmp_path / "seg")
    Segment.create(SMALL_GROW, path=path, features=features).close()
    with Segment.attach(path) as seg:
        assert seg.features == features
        growable = bool(features & L.FEATURE_EXTENTS)
        assert seg.config == (SMALL_GROW if growable else SegmentConfig(max_guests=2, bipbuf_capacity=64, size_classes=((64, 4), (256, 2))))
        assert seg.max_extents(1) == (3 if growable else 1)


# Garbage in the FEATURE_EXTENTS fields of both class headers (bytes 16..60).
CLASS_PAD_GARBAGE = [
    (L.CLS_EXTENT_COUNT, (7).to_bytes(4, "little")),
    (L.CLS_MAX_EXTENTS, (99).to_bytes(4, "little")),
    (L.CLS_EXTENT_OFFSETS, (1 << 50).to_bytes(8, "little") * 4),
    (L.CLS_GROW_REQUEST, (1).to_bytes(4, "little")),
]


def test_features_zero_ignores_class_header_padding(tmp_path):
    # DECISIONS 4: without FEATURE_EXTENTS the class-header padding means nothing (upstream may
    # leave anything there); with it, the same bytes are validated
    for features, ok in ((0, True), (L.KNOWN_FEATURES, False)):
        path = str(tmp_path / f"seg{features}")
        seg = Segment.create(SMALL, path=path, features=features)
        for cl in seg.layout.classes:
            for off, data in CLASS_PAD_GARBAGE:
                seg.region.write(cl.header_offset + off, data)
        seg.close()  # the file stays
        if not ok:
            with pytest.raises(SegmentCorrupted):
                Segment.attach(path)
            continue
        with Segment.attach(path) as seg:
            assert seg.config == SMALL
            assert [seg.extent_count(c) for c in range(2)] == [1, 1]
            assert [seg.pool.mapped_extents(c) for c in range(2)] == [1, 1]
            assert seg.growth_requests() == [] and seg.refresh_extents() == 0
            assert seg.grow_class(0) is False and seg.file_size == seg.total_size
            got = [seg.alloc(10, 1) for _ in range(6)]
            assert got == [(0, 0, s, 1) for s in range(4)] + [(1, 0, s, 1) for s in range(2)]
            assert seg.alloc(10, 1) is None
            for ref in got:
                seg.pool.free(*ref)
            assert seg.pool.counts(0) == (4, 0) and seg.pool.counts(1) == (2, 0)


def test_create_rejects_non_config():
    with pytest.raises(ConfigError):
        Segment.create({"max_guests": 2})


def test_header_fields_written(shm_path):
    with Segment.create(ODD, path=shm_path) as seg:
        r = seg.region
        lay = seg.layout
        assert r.load_u64(L.HDR_TOTAL_SIZE) == lay.total_size
        assert r.load_u32(L.HDR_MAX_PAYLOAD_SIZE) == 777_777
        assert r.load_u32(L.HDR_INLINE_THRESHOLD) == 100
        assert r.load_u32(L.HDR_MAX_GUESTS) == 3
        assert r.load_u32(L.HDR_BIPBUF_CAPACITY) == 192
        assert r.load_u64(L.HDR_PEER_TABLE_OFFSET) == 128
        assert r.load_u64(L.HDR_VAR_POOL_OFFSET) == lay.var_pool_offset
        assert r.load_u64(L.HDR_HEARTBEAT_INTERVAL) == 123_456_789
        assert r.load_u32(L.HDR_HOST_GOODBYE) == 0
        assert r.load_u32(L.HDR_NUM_CLASSES) == 3
        assert r.load_u64(L.HDR_CURRENT_SIZE) == lay.total_size
        for p in range(1, 4):
            assert r.load_u64(lay.peer_entry_offset(p) + L.PEER_RING_OFFSET) == lay.ring_offset(p)
            for off in (lay.g2h_offset(p), lay.h2g_offset(p)):
                assert r.load_u32(off + L.RING_CAPACITY) == 192
                assert seg.g2h(p).capacity == seg.h2g(p).capacity == 192


def test_create_named(shm_path):
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        seg = Segment.create(SMALL, path=shm_path)
    finally:
        os.umask(old)
    try:
        assert seg.path == shm_path
        st = os.stat(shm_path)
        assert stat.S_IMODE(st.st_mode) == 0o600  # DECISIONS 16
        assert st.st_size == seg.total_size
        # the live host holds an exclusive flock: `clean` can tell it from a stale file
        probe = os.open(shm_path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seg.close()
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the host's fd
            fcntl.flock(probe, fcntl.LOCK_UN)
        finally:
            os.close(probe)
        assert os.path.exists(shm_path)  # kept until unlink()
        seg.unlink()
        assert not os.path.exists(shm_path)
        seg.unlink()  # idempotent
    finally:
        seg.close()
        if os.path.exists(shm_path):
            os.unlink(shm_path)


def test_create_named_refuses_existing_path(shm_path):
    with open(shm_path, "wb") as f:
        f.write(b"precious")
    try:
        with pytest.raises(SegmentError) as ei:
            Segment.create(SMALL, path=shm_path)
        assert "clean" in str(ei.value)  # names the fix
        with open(shm_path, "rb") as f:
            assert f.read() == b"precious"  # neither overwritten nor removed
    finally:
        os.unlink(shm_path)


def test_create_in_missing_directory_is_typed(tmp_path):
    # errors.py: every error raised by the library derives from ShmhubError
    with pytest.raises(SegmentError):
        Segment.create(SMALL, path=str(tmp_path / "no" / "such" / "dir" / "seg"))


def test_create_too_big_for_dev_shm_fails_fast(shm_path):
    # DECISIONS 16: fails fast, names the fix, leaves nothing in /dev/shm
    huge = SegmentConfig(max_guests=1, bipbuf_capacity=64, size_classes=((1 << 30, 1 << 20),))
    with pytest.raises(InsufficientSharedMemory) as ei:
        Segment.create(huge, path=shm_path)
    msg = str(ei.value)
    assert "/dev/shm" in msg and "clean" in msg
    assert not os.path.exists(shm_path)


def test_context_manager_unlinks_owned_named_segment(shm_path):
    with Segment.create(SMALL, path=shm_path) as seg:
        with Segment.attach(shm_path) as guest:
            assert not guest.closed
        assert guest.closed
        assert os.path.exists(shm_path)  # a guest's exit never removes the host's file
    assert seg.closed
    assert not os.path.exists(shm_path)


def test_context_manager_cleans_up_on_exception(shm_path):
    with pytest.raises(RuntimeError):
        with Segment.create(SMALL, path=shm_path) as seg:
            raise RuntimeError("boom")
    assert seg.closed and not os.path.exists(shm_path)


def test_close_is_idempotent_and_stops_access():
    seg = Segment.create(SMALL)
    pool, region = seg.pool, seg.region
    seg.close()
    seg.close()
    assert seg.closed and region.closed
    with pytest.raises(ValueError):
        region.load_u32(0)
    with pytest.raises(ValueError):
        pool.alloc(10, 0)


# --- attach ----------------------------------------------------------------------------------


def test_attach_by_path(shm_path):
    with Segment.create(ODD, path=shm_path) as host:
        with Segment.attach(shm_path) as guest:
            assert guest.path == shm_path
            assert guest.config == ODD
            assert guest.layout == host.layout
            # one memory: a store through either mapping is visible through the other
            host.region.store_u32(L.HDR_HOST_GOODBYE, 1)
            assert guest.host_goodbye
            guest.region.store_u64(host.layout.peer_entry_offset(2) + L.PEER_LAST_HEARTBEAT, 42)
            assert host.peers.last_heartbeat(2) == 42


def test_attach_by_fd_duplicates_it():
    host = Segment.create(SMALL)
    try:
        fd = os.dup(host.fd)
        guest = Segment.attach(fd)
        try:
            assert guest.fd != fd and guest.path is None
            assert os.path.sameopenfile(guest.fd, fd)
            assert fcntl.fcntl(guest.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            os.close(fd)  # the caller's fd is its own business
            host.close()  # and the host going away does not unmap the guest
            assert guest.config == SMALL
            c, e, s, g = guest.pool.alloc(10, 1)
            guest.pool.write_payload(c, s, b"still here", e)
            assert guest.pool.read_payload(c, s, e) == b"still here"
            assert os.fstat(guest.fd).st_size == guest.size
        finally:
            guest.close()
        with pytest.raises(OSError):
            os.fstat(guest.fd)  # closed by close()
    finally:
        host.close()


def test_attach_readonly_fd(shm_path):
    with Segment.create(SMALL, path=shm_path):
        fd = os.open(shm_path, os.O_RDONLY)
        try:
            with Segment.attach(fd, writable=False) as guest:
                assert guest.config == SMALL and not guest.region.writable
        finally:
            os.close(fd)


def test_attach_writable_from_readonly_fd_is_typed(shm_path):
    # mmap(PROT_WRITE) of an O_RDONLY fd fails: the error must be a typed SegmentError
    with Segment.create(SMALL, path=shm_path):
        fd = os.open(shm_path, os.O_RDONLY)
        try:
            with pytest.raises(SegmentError):
                Segment.attach(fd)
        finally:
            os.close(fd)


def test_readonly_attach_refuses_stores(shm_path):
    with Segment.create(SMALL, path=shm_path) as host:
        with Segment.attach(shm_path, writable=False) as guest:
            assert guest.config == SMALL
            assert not guest.region.writable
            with pytest.raises(PermissionError):
                guest.region.store_u32(L.HDR_HOST_GOODBYE, 1)
            with pytest.raises(PermissionError):
                guest.region.write(200, b"x")
            with pytest.raises(PermissionError):
                guest.say_goodbye()
            with pytest.raises(PermissionError):
                guest.peers.attach()
            with pytest.raises(PermissionError):
                guest.peers.heartbeat(1)
            with pytest.raises(PermissionError):
                guest.pool.format()
            assert not host.host_goodbye
            assert host.peers.state(1) == L.PEER_EMPTY
            # reads work
            assert guest.pool.counts(0) == (4, 0)
            assert guest.peers.state(1) == L.PEER_EMPTY


READONLY_OPS = {
    "pool.alloc": "g.pool.alloc(10, 0)",
    "pool.alloc_in_class": "g.pool.alloc_in_class(1, 0)",
    "pool.free": "g.pool.free(0, 0, 0, 1)",
    "pool.free_if_current": "g.pool.free_if_current(0, 0, 0, 1)",
    "pool.take": "g.pool.take(0, 0, 0, 1, 2)",
    "pool.write_payload": "g.pool.write_payload(0, 0, b'x')",
    "pool.set_payload_len": "g.pool.set_payload_len(0, 0, 1)",
    "pool.reclaim": "g.pool.reclaim(1)",
    "ring.write_inline": "g.g2h(1).write_inline(b'hello')",
    "ring.reset": "g.h2g(1).reset()",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("op", sorted(READONLY_OPS))
def test_readonly_attach_mutators_raise_not_crash(shm_path, op):
    # A read-only mapping must refuse every store with PermissionError, never SIGSEGV. Run in a
    # child so a crash is reported instead of killing the test run.
    code = textwrap.dedent(
        f"""
        import sys
        from shmhub import Segment
        g = Segment.attach(sys.argv[1], writable=False)
        try:
            {READONLY_OPS[op]}
        except PermissionError:
            print("PermissionError")
        """
    )
    with Segment.create(SMALL, path=shm_path) as host:
        assert host.pool.alloc_in_class(0, 1) == (0, 0, 0, 1)
        before = host.region.read(0, host.size)
        proc = subprocess.run([sys.executable, "-c", code, shm_path], capture_output=True, text=True, timeout=50)
        assert proc.returncode == 0, f"{op} on a read-only mapping: exit {proc.returncode} {proc.stderr[-500:]}"
        assert proc.stdout.strip() == "PermissionError"
        assert host.region.read(0, host.size) == before


@pytest.mark.parametrize("how", ["path", "fd"])
@pytest.mark.parametrize("op", ["grow_class", "grow_for", "request_growth"])
def test_readonly_attach_cannot_grow(shm_path, how, op):
    # Growth is a mutator too: on a read-only attach it raises PermissionError and leaves the
    # file as it was (size included), also when the fd itself would allow writing.
    with Segment.create(SMALL_GROW, path=shm_path) as host:
        before = host.region.read(0, host.size)
        size = host.file_size
        if how == "fd":
            fd = os.open(shm_path, os.O_RDWR)
            try:
                guest = Segment.attach(fd, writable=False)
            finally:
                os.close(fd)
        else:
            guest = Segment.attach(shm_path, writable=False)
        with guest:
            call = {"grow_class": lambda: guest.grow_class(1), "grow_for": lambda: guest.grow_for(100), "request_growth": lambda: guest.request_growth(100)}[op]
            with pytest.raises(PermissionError):
                call()
        assert host.file_size == size
        assert host.region.read(0, host.size) == before
        assert host.extent_count(1) == 1


def test_telex_magic_is_accepted(tmp_path):
    # DECISIONS 1: upstream's later name for the same layout
    path = str(tmp_path / "seg")
    Segment.create(SMALL, path=path).close()
    with open(path, "r+b") as f:
        f.write(L.MAGIC_TELEX)
    with Segment.attach(path) as seg:
        assert seg.magic == L.MAGIC_TELEX
        assert seg.config == SMALL


def test_guest_rebuilds_everything_from_segment(tmp_path):
    # trap 12: the attach takes no config; every offset comes from the segment itself
    path = str(tmp_path / "seg")
    with Segment.create(ODD, path=path) as host:
        with Segment.attach(path) as guest:
            assert guest.config == ODD
            assert guest.layout == host.layout
            assert guest.layout != Layout.compute(8, 256 * 1024, SegmentConfig().size_classes)
            assert guest.inline_threshold == host.inline_threshold == 88  # clamped to 192 // 2 - 8
            assert [guest.pool.class_info(c) for c in range(guest.pool.num_classes)] == list(ODD.size_classes)
            for p in range(1, 4):
                assert guest.peers.ring_offset(p) == host.layout.ring_offset(p)
                assert guest.g2h(p).offset == host.layout.g2h_offset(p)
                assert guest.h2g(p).offset == host.layout.h2g_offset(p)
            # and the guest's view is the host's: a slot written by one is read by the other
            c, e, s, g = host.pool.alloc(300, 1)
            assert (c, e) == (1, 0)
            host.pool.write_payload(c, s, b"odd", e)
            assert guest.pool.take(c, e, s, g, 2) == 3
            assert guest.pool.read_payload(c, s, e) == b"odd"
            assert guest.g2h(3).write_inline(b"ping")
            assert host.g2h(3).recv_inline() == b"ping"


# --- attach: bad input -----------------------------------------------------------------------


@pytest.mark.timeout(10)
def test_attach_nonexistent_path_is_typed(tmp_path):
    with pytest.raises(SegmentError):
        Segment.attach(str(tmp_path / "missing"))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("writable", [True, False])
def test_attach_directory_is_typed(tmp_path, writable):
    with pytest.raises(SegmentError):
        Segment.attach(str(tmp_path), writable=writable)


@pytest.mark.timeout(10)
def test_attach_directory_fd(tmp_path):
    fd = os.open(str(tmp_path), os.O_RDONLY)
    try:
        with pytest.raises(SegmentError):
            Segment.attach(fd)
    finally:
        os.close(fd)


@pytest.mark.timeout(10)
def test_attach_closed_fd():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(SegmentError):
        Segment.attach(r)
    with pytest.raises(SegmentError):
        Segment.attach(-1)


@pytest.mark.timeout(10)
def test_attach_socket_or_pipe_fd():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        for fd in (a.fileno(), r, w):
            with pytest.raises(SegmentError):
                Segment.attach(fd)
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("writable", [True, False])
def test_attach_fifo_neither_hangs_nor_crashes(tmp_path, writable):
    # A FIFO at the path (nobody writing): attach must fail with SegmentError, not block in open().
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    code = textwrap.dedent(
        f"""
        import sys
        from shmhub import Segment, SegmentError
        try:
            Segment.attach(sys.argv[1], writable={writable})
        except SegmentError:
            print("SegmentError")
        """
    )
    try:
        proc = subprocess.run([sys.executable, "-c", code, fifo], capture_output=True, text=True, timeout=3)
    except subprocess.TimeoutExpired:
        pytest.fail(f"Segment.attach(<fifo>, writable={writable}) hung")
    assert proc.returncode == 0, proc.stderr[-500:]
    assert proc.stdout.strip() == "SegmentError"


# Corrupt files: a real segment of CORRUPT_CFG in tmp_path, closed, patched, re-attached.
CORRUPT_CFG = SegmentConfig(max_guests=3, bipbuf_capacity=128, size_classes=((64, 4), (256, 2)))
CLAY = Layout.compute(3, 128, CORRUPT_CFG.size_classes)


def _u32(off, v):
    return [(off, v.to_bytes(4, "little"))]


def _u64(off, v):
    return [(off, v.to_bytes(8, "little"))]


CORRUPTIONS = {
    # truncated files
    "empty file": (("truncate", 0), SegmentCorrupted),
    "100 bytes": (("truncate", 100), SegmentCorrupted),
    "header only": (("truncate", 128), SegmentCorrupted),
    "cut in peer table": (("truncate", 128 + 64 + 10), SegmentCorrupted),
    "cut in rings": (("truncate", CLAY.ring_base + 300), SegmentCorrupted),
    "cut at pool start": (("truncate", CLAY.var_pool_offset), SegmentCorrupted),
    "cut in class headers": (("truncate", CLAY.var_pool_offset + 70), SegmentCorrupted),
    "cut in pool data": (("truncate", CLAY.total_size - 1), SegmentCorrupted),
    # magic (DECISIONS 1)
    "magic zero": (_u64(0, 0), BadMagic),
    "magic garbage": ([(0, b"NOTAHUB!")], BadMagic),
    "magic v6": ([(0, b"ROAMHUB\x06")], BadMagic),
    "magic legacy v2": ([(0, b"RAPAHUB\x01")], BadMagic),
    "magic rapace": ([(0, b"RAPAHUB\x00")], BadMagic),
    "magic lowercase": ([(0, b"roamhub\x07")], BadMagic),
    # version / header size / features
    "version 6": (_u32(L.HDR_VERSION, 6), UnsupportedVersion),
    "version 8": (_u32(L.HDR_VERSION, 8), UnsupportedVersion),
    "version 2": (_u32(L.HDR_VERSION, 2), UnsupportedVersion),
    "header_size 64": (_u32(L.HDR_HEADER_SIZE, 64), UnsupportedVersion),
    "header_size 256": (_u32(L.HDR_HEADER_SIZE, 256), UnsupportedVersion),
    "header_size 0": (_u32(L.HDR_HEADER_SIZE, 0), UnsupportedVersion),
    # bits 0-2 are our documented extensions (docs/extensions.md); bit 3 is the first unknown one
    "feature bit 7": (_u32(L.HDR_FEATURES, 1 << 7), UnsupportedVersion),
    "feature bit 7 with the known ones": (_u32(L.HDR_FEATURES, L.KNOWN_FEATURES | 1 << 7), UnsupportedVersion),
    "feature bit 31": (_u32(L.HDR_FEATURES, 1 << 31), UnsupportedVersion),
    # offsets and sizes
    "var_pool_offset = total_size": (_u64(L.HDR_VAR_POOL_OFFSET, CLAY.total_size), SegmentCorrupted),
    "var_pool_offset near 2^64": (_u64(L.HDR_VAR_POOL_OFFSET, (1 << 64) - 64), SegmentCorrupted),
    "var_pool_offset misaligned": (_u64(L.HDR_VAR_POOL_OFFSET, CLAY.var_pool_offset + 4), SegmentCorrupted),
    "var_pool_offset +64": (_u64(L.HDR_VAR_POOL_OFFSET, CLAY.var_pool_offset + 64), SegmentCorrupted),
    "var_pool_offset -64": (_u64(L.HDR_VAR_POOL_OFFSET, CLAY.var_pool_offset - 64), SegmentCorrupted),
    "var_pool_offset 0": (_u64(L.HDR_VAR_POOL_OFFSET, 0), SegmentCorrupted),
    "total_size > file": (_u64(L.HDR_TOTAL_SIZE, CLAY.total_size + 64) + _u64(L.HDR_CURRENT_SIZE, CLAY.total_size + 64), SegmentCorrupted),
    "total_size 2^64-1": (_u64(L.HDR_TOTAL_SIZE, (1 << 64) - 1), SegmentCorrupted),
    "total_size smaller": (_u64(L.HDR_TOTAL_SIZE, CLAY.total_size - 64), SegmentCorrupted),
    "total_size 0": (_u64(L.HDR_TOTAL_SIZE, 0), SegmentCorrupted),
    "current_size > file": (_u64(L.HDR_CURRENT_SIZE, CLAY.total_size + 1), SegmentCorrupted),
    "current_size < total": (_u64(L.HDR_CURRENT_SIZE, CLAY.total_size - 1), SegmentCorrupted),
    "current_size 0": (_u64(L.HDR_CURRENT_SIZE, 0), SegmentCorrupted),
    "peer_table_offset 0": (_u64(L.HDR_PEER_TABLE_OFFSET, 0), SegmentCorrupted),
    "peer_table_offset 192": (_u64(L.HDR_PEER_TABLE_OFFSET, 192), SegmentCorrupted),
    # classes
    "zero classes": (_u32(L.HDR_NUM_CLASSES, 0), SegmentCorrupted),
    "one class fewer": (_u32(L.HDR_NUM_CLASSES, 1), SegmentCorrupted),
    "one class more": (_u32(L.HDR_NUM_CLASSES, 3), SegmentCorrupted),
    "257 classes": (_u32(L.HDR_NUM_CLASSES, 257), SegmentCorrupted),
    "2^32-1 classes": (_u32(L.HDR_NUM_CLASSES, L.U32_MAX), SegmentCorrupted),
    "slot_count 0": (_u32(CLAY.classes[1].header_offset + L.CLS_SLOT_COUNT, 0), SegmentCorrupted),
    "slot_count EMPTY": (_u32(CLAY.classes[0].header_offset + L.CLS_SLOT_COUNT, L.EMPTY_INDEX), SegmentCorrupted),
    "slot_count +1": (_u32(CLAY.classes[0].header_offset + L.CLS_SLOT_COUNT, 5), SegmentCorrupted),
    "slot_size 0": (_u32(CLAY.classes[0].header_offset + L.CLS_SLOT_SIZE, 0), SegmentCorrupted),
    "slot_size 3": (_u32(CLAY.classes[0].header_offset + L.CLS_SLOT_SIZE, 3), SegmentCorrupted),
    "slot_size doubled": (_u32(CLAY.classes[1].header_offset + L.CLS_SLOT_SIZE, 512), SegmentCorrupted),
    "slot class beyond any mapping": (
        _u32(CLAY.classes[0].header_offset + L.CLS_SLOT_SIZE, 0xFFFFFFC0) + _u32(CLAY.classes[0].header_offset + L.CLS_SLOT_COUNT, 0xFFFFFFFE),
        SegmentCorrupted,
    ),
    # FEATURE_EXTENTS fields (CORRUPT_CFG's classes cannot grow; the segment has the feature bit)
    "max_extents 6": (_u32(CLAY.classes[0].header_offset + L.CLS_MAX_EXTENTS, L.MAX_EXTENTS + 1), SegmentCorrupted),
    "max_extents u32 max": (_u32(CLAY.classes[1].header_offset + L.CLS_MAX_EXTENTS, L.U32_MAX), SegmentCorrupted),
    "extent_count beyond max_extents": (_u32(CLAY.classes[1].header_offset + L.CLS_EXTENT_COUNT, 2), SegmentCorrupted),
    "extent past the file": (
        _u32(CLAY.classes[0].header_offset + L.CLS_MAX_EXTENTS, 2)
        + _u32(CLAY.classes[0].header_offset + L.CLS_EXTENT_COUNT, 2)
        + _u64(CLAY.classes[0].header_offset + L.CLS_EXTENT_OFFSETS, 1 << 50),
        SegmentCorrupted,
    ),
    "extent over the v7 area": (
        _u32(CLAY.classes[0].header_offset + L.CLS_MAX_EXTENTS, 2)
        + _u32(CLAY.classes[0].header_offset + L.CLS_EXTENT_COUNT, 2)
        + _u64(CLAY.classes[0].header_offset + L.CLS_EXTENT_OFFSETS, 0),
        SegmentCorrupted,
    ),
    # rings and peers
    "g2h capacity disagrees": (_u32(CLAY.g2h_offset(1) + L.RING_CAPACITY, 64), SegmentCorrupted),
    "h2g capacity disagrees": (_u32(CLAY.h2g_offset(3) + L.RING_CAPACITY, 256), SegmentCorrupted),
    "ring capacity 0": (_u32(CLAY.h2g_offset(2) + L.RING_CAPACITY, 0), SegmentCorrupted),
    "peer ring_offset disagrees": (_u64(CLAY.peer_entry_offset(2) + L.PEER_RING_OFFSET, CLAY.ring_offset(2) + 64), SegmentCorrupted),
    "peer ring_offset past end": (_u64(CLAY.peer_entry_offset(3) + L.PEER_RING_OFFSET, 1 << 50), SegmentCorrupted),
    "peer ring_offset 0": (_u64(CLAY.peer_entry_offset(1) + L.PEER_RING_OFFSET, 0), SegmentCorrupted),
    "bipbuf_capacity 100": (_u32(L.HDR_BIPBUF_CAPACITY, 100), SegmentCorrupted),
    "bipbuf_capacity 0": (_u32(L.HDR_BIPBUF_CAPACITY, 0), SegmentCorrupted),
    "bipbuf_capacity 32": (_u32(L.HDR_BIPBUF_CAPACITY, 32), SegmentCorrupted),
    "bipbuf_capacity 192": (_u32(L.HDR_BIPBUF_CAPACITY, 192), SegmentCorrupted),
    "bipbuf_capacity u32 max": (_u32(L.HDR_BIPBUF_CAPACITY, 0xFFFFFFC0), SegmentCorrupted),
    "max_guests 0": (_u32(L.HDR_MAX_GUESTS, 0), SegmentCorrupted),
    "max_guests 256": (_u32(L.HDR_MAX_GUESTS, 256), SegmentCorrupted),
    "max_guests 255": (_u32(L.HDR_MAX_GUESTS, 255), SegmentCorrupted),
    "max_guests 2": (_u32(L.HDR_MAX_GUESTS, 2), SegmentCorrupted),
    "max_guests u32 max": (_u32(L.HDR_MAX_GUESTS, L.U32_MAX), SegmentCorrupted),
}


def _make_corrupt(tmp_path, patch):
    path = str(tmp_path / "seg")
    Segment.create(CORRUPT_CFG, path=path).close()
    if isinstance(patch, tuple) and patch[0] == "truncate":
        os.truncate(path, patch[1])
    else:
        with open(path, "r+b") as f:
            for off, data in patch:
                f.seek(off)
                f.write(data)
    return path


# Attached also by fd and read-only (the same validation must run whatever the way in).
OTHER_WAYS = [
    "empty file",
    "100 bytes",
    "header only",
    "cut in pool data",
    "magic garbage",
    "version 8",
    "feature bit 7",
    "var_pool_offset near 2^64",
    "total_size > file",
    "zero classes",
    "slot class beyond any mapping",
    "h2g capacity disagrees",
    "peer ring_offset disagrees",
    "max_guests 256",
]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "case, how",
    [(c, "path") for c in sorted(CORRUPTIONS)] + [(c, h) for c in OTHER_WAYS for h in ("fd", "path-readonly")],
)
def test_attach_corrupt_segment(tmp_path, case, how):
    patch, exc = CORRUPTIONS[case]
    path = _make_corrupt(tmp_path, patch)
    size_before = os.path.getsize(path)
    with open(path, "rb") as f:
        content_before = f.read()
    with pytest.raises(exc) as ei:
        if how == "fd":
            fd = os.open(path, os.O_RDWR)
            try:
                Segment.attach(fd)
            finally:
                os.close(fd)
        else:
            Segment.attach(path, writable=(how == "path"))
    assert str(ei.value)  # says what it found
    # the failed attach did not "repair" or otherwise write to the file
    assert os.path.getsize(path) == size_before
    with open(path, "rb") as f:
        assert f.read() == content_before


def test_corrupt_segment_baseline_attaches(tmp_path):
    # the unpatched file used by test_attach_corrupt_segment is fine
    path = _make_corrupt(tmp_path, [])
    with Segment.attach(path) as seg:
        assert seg.config == CORRUPT_CFG and seg.layout == CLAY


def test_bad_magic_message_says_what_it_found(tmp_path):
    path = _make_corrupt(tmp_path, [(0, b"NOTAHUB!")])
    with pytest.raises(BadMagic) as ei:
        Segment.attach(path)
    assert "NOTAHUB!" in str(ei.value)


def test_error_hierarchy():
    for exc in (BadMagic, UnsupportedVersion):
        assert issubclass(exc, SegmentCorrupted)
    assert issubclass(SegmentCorrupted, SegmentError) and issubclass(SegmentError, ShmhubError)
    assert issubclass(InsufficientSharedMemory, SegmentError)


def test_nonzero_header_fields_outside_checks_round_trip(tmp_path):
    # fields the attach does not police (max_payload_size, inline_threshold, heartbeat) are read
    # back as written, not replaced by defaults (trap 12)
    path = _make_corrupt(
        tmp_path,
        _u32(L.HDR_MAX_PAYLOAD_SIZE, 12345) + _u32(L.HDR_INLINE_THRESHOLD, 0) + _u64(L.HDR_HEARTBEAT_INTERVAL, 99),
    )
    with Segment.attach(path) as seg:
        assert seg.config.max_payload_size == 12345
        assert seg.config.inline_threshold == 0
        assert seg.inline_threshold == 56  # 0 means 256, clamped to 128 // 2 - 8
        assert seg.config.heartbeat_interval_ns == 99


def test_grown_segment_attaches(tmp_path):
    # current_size may exceed total_size after growth (format-v7 1.8) as long as the file has it
    path = _make_corrupt(tmp_path, _u64(L.HDR_CURRENT_SIZE, CLAY.total_size + 4096))
    os.truncate(path, CLAY.total_size + 4096)
    with Segment.attach(path) as seg:
        assert seg.current_size == CLAY.total_size + 4096
        assert seg.size == CLAY.total_size + 4096
        assert seg.total_size == CLAY.total_size


# --- trap 11: natural alignment of every atomic ------------------------------------------------

ATOMICS = [
    # (name, offset within its structure, size)
    ("HDR_HOST_GOODBYE", L.HDR_HOST_GOODBYE, 4),
    ("HDR_CURRENT_SIZE", L.HDR_CURRENT_SIZE, 8),
    ("HDR_TOTAL_SIZE", L.HDR_TOTAL_SIZE, 8),
    ("HDR_PEER_TABLE_OFFSET", L.HDR_PEER_TABLE_OFFSET, 8),
    ("HDR_VAR_POOL_OFFSET", L.HDR_VAR_POOL_OFFSET, 8),
    ("HDR_HEARTBEAT_INTERVAL", L.HDR_HEARTBEAT_INTERVAL, 8),
    ("HDR_VERSION", L.HDR_VERSION, 4),
    ("HDR_NUM_CLASSES", L.HDR_NUM_CLASSES, 4),
    ("HDR_FEATURES", L.HDR_FEATURES, 4),
    ("PEER_STATE", L.PEER_STATE, 4),
    ("PEER_EPOCH", L.PEER_EPOCH, 4),
    ("PEER_LAST_HEARTBEAT", L.PEER_LAST_HEARTBEAT, 8),
    ("PEER_RING_OFFSET", L.PEER_RING_OFFSET, 8),
    ("RING_WRITE", L.RING_WRITE, 4),
    ("RING_WATERMARK", L.RING_WATERMARK, 4),
    ("RING_CAPACITY", L.RING_CAPACITY, 4),
    ("RING_READ", L.RING_READ, 4),
    ("CLS_FREE_HEAD", L.CLS_FREE_HEAD, 8),
    ("META_GENERATION (u64 CAS word with state)", L.META_GENERATION, 8),
    ("META_STATE", L.META_STATE, 4),
    ("META_OWNER", L.META_OWNER, 4),
    ("META_NEXT_FREE", L.META_NEXT_FREE, 4),
]


@pytest.mark.parametrize("name, off, size", ATOMICS, ids=[a[0] for a in ATOMICS])
def test_atomic_fields_naturally_aligned(name, off, size):
    assert off % size == 0, f"{name} at {off} is not {size}-aligned (trap 11)"


def test_structure_sizes_keep_alignment():
    assert L.HEADER_SIZE % 64 == 0 and L.PEER_TABLE_OFFSET % 64 == 0
    assert L.PEER_ENTRY_SIZE % 8 == 0 and L.SLOT_META_SIZE % 8 == 0
    assert L.RING_HEADER_SIZE % 64 == 0 and L.CLASS_HEADER_SIZE % 64 == 0
    assert L.META_STATE == L.META_GENERATION + 4  # generation and state form the free CAS word
    assert L.RING_READ - L.RING_WRITE >= 64  # producer and consumer fields on separate lines


@pytest.mark.parametrize("cfg", [SMALL, ODD, SegmentConfig(max_guests=5, bipbuf_capacity=64 * 3, size_classes=((64, 1), (128, 3), (192, 7)))])
def test_every_atomic_is_aligned_in_real_segments(cfg):
    # trap 11, end to end: every base is 64-aligned and the bounds/alignment-checked Region
    # accepts an atomic access at every atomic field of the segment
    with Segment.create(cfg) as seg:
        lay, r = seg.layout, seg.region
        bases = [lay.peer_table_offset, lay.ring_base, lay.var_pool_offset]
        for p in range(1, cfg.max_guests + 1):
            bases += [lay.g2h_offset(p), lay.h2g_offset(p)]
            e = lay.peer_entry_offset(p)
            assert e % 64 == 0
            r.load_u32(e + L.PEER_STATE)
            r.load_u32(e + L.PEER_EPOCH)
            r.load_u64(e + L.PEER_LAST_HEARTBEAT)
            r.load_u64(e + L.PEER_RING_OFFSET)
            for ro in (lay.g2h_offset(p), lay.h2g_offset(p)):
                for f in (L.RING_WRITE, L.RING_WATERMARK, L.RING_CAPACITY, L.RING_READ):
                    r.load_u32(ro + f)
        for c in lay.classes:
            bases += [c.header_offset, c.meta_offset, c.data_offset]
            r.load_u64(c.header_offset + L.CLS_FREE_HEAD)
            for s in range(c.slot_count):
                m = c.meta_offset + s * L.SLOT_META_SIZE
                r.load_u64(m + L.META_GENERATION)
                r.load_u32(m + L.META_OWNER)
                r.load_u32(m + L.META_NEXT_FREE)
        assert all(b % 64 == 0 for b in bases), bases
        r.load_u32(L.HDR_HOST_GOODBYE)
        r.load_u64(L.HDR_CURRENT_SIZE)


# --- Region ----------------------------------------------------------------------------------


def test_region_bounds_and_alignment():
    with Segment.create(SMALL) as seg:
        r = seg.region
        n = r.size
        for bad in (-4, n, n + 4, 1 << 50):
            with pytest.raises(IndexError):
                r.load_u32(bad)
        with pytest.raises(IndexError):
            r.load_u64(n - 4)
        with pytest.raises(IndexError):
            r.read(n - 4, 5)
        with pytest.raises(IndexError):
            r.write(n - 2, b"abc")
        with pytest.raises(IndexError):
            r.read(0, -1)
        for off in (1, 2, 3):
            with pytest.raises(ValueError):
                r.load_u32(off)
        for off in (4, 12):
            with pytest.raises(ValueError):
                r.load_u64(off)
            with pytest.raises(ValueError):
                r.cas_u64(off, 0, 1)
        assert r.load_u32(n - 4) == 0
        assert r.read(n - 4, 4) == bytes(4)
        # atomics
        off = L.HDR_HOST_GOODBYE
        assert r.cas_u32(off, 0, 5) == 0 and r.load_u32(off) == 5
        assert r.cas_u32(off, 0, 6) == 5 and r.load_u32(off) == 5
        assert r.fetch_add_u32(off, 2) == 5 and r.load_u32(off) == 7
        r.store_u32(off, 0)
        off64 = L.HDR_CURRENT_SIZE
        total = r.load_u64(off64)
        assert r.fetch_add_u64(off64, 1) == total and r.load_u64(off64) == total + 1
        assert r.cas_u64(off64, total + 1, total) == total + 1


def test_region_view_keeps_mapping_alive():
    seg = Segment.create(SMALL)
    v = seg.region.view(0, 8)
    assert bytes(v) == L.MAGIC
    assert seg.region.exported_views >= 1
    seg.close()
    assert bytes(v) == L.MAGIC  # still mapped while the view lives
    with pytest.raises(ValueError):
        seg.region.view(0, 8)
    v.release()
    assert seg.region.exported_views == 0


def test_region_rejects_bad_sizes():
    fd = os.memfd_create("t")
    try:
        os.ftruncate(fd, 4096)
        for bad in (0, -1):
            with pytest.raises(ValueError):
                Region(fd, bad)
        with pytest.raises(OSError):
            Region(-1, 4096)
        r = Region(fd, 4096, False)
        with pytest.raises(PermissionError):
            r.store_u64(0, 1)
        with pytest.raises(PermissionError):
            r.zero(0, 8)
        with pytest.raises(PermissionError):
            r.cas_u32(0, 0, 1)
        with pytest.raises(PermissionError):
            r.fetch_add_u64(0, 1)
        r.close()
    finally:
        os.close(fd)
