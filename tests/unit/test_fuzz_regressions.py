"""Inputs the fuzzers (tests/fuzz, docs/hardening.md) found raising something other than a
ShmhubError, each reduced to the smallest case: the fix is that they raise a typed error."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from shmhub.errors import ShmhubError


def _send_fd(sock: socket.socket, data: bytes, fd: int) -> None:
    try:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", ["empty memfd", "/dev/null", "pipe"])
def test_executor_fd_socket_unmappable_fd(kind):
    """fuzz target executor_fds: an ATTACH datagram whose fd cannot be mapped (an empty file:
    mmap's ValueError; /dev/null or a pipe: OSError) raised those, not a ShmhubError."""
    pytest.importorskip("numpy")
    from shmhub.executor._shared import ATTACH, WorkerRegions, _MSG

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if kind == "empty memfd":
            fd = os.memfd_create("empty", os.MFD_CLOEXEC)
        elif kind == "/dev/null":
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        else:
            fd, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
        _send_fd(a, _MSG.pack(ATTACH, 7), fd)
        regions = WorkerRegions(b)
        with pytest.raises(ShmhubError, match="cannot map the fd"):
            regions.fetch(7)
        assert not regions.maps
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("dtype", ["(,u1", ",.", ".,u1"])
def test_executor_array_reference_bad_dtype(dtype):
    """fuzz target executor_fds: a region reference whose dtype string numpy's parser rejects with
    a SyntaxError (not only TypeError/ValueError) escaped as that SyntaxError."""
    pytest.importorskip("numpy")
    import mmap
    import weakref

    from shmhub.executor._shared import _Region, _table

    mm = mmap.mmap(-1, 4096)
    rid = -12345  # a worker's region ids are positive: no clash with a real one
    with _table.lock:
        _table.by_id[rid] = _Region(rid, -1, 4096, 0, weakref.ref(mm))
    try:
        with pytest.raises(ShmhubError, match="bad reference"):
            _table.array(rid, 0, (1,), dtype, (1,))
    finally:
        with _table.lock:
            del _table.by_id[rid]
        mm.close()


def _array_payload(dtype: bytes, shape: tuple, off: int = 64) -> bytes:
    from shmhub.codec import _HEAD, ARRAY_MAGIC

    head = _HEAD.pack(ARRAY_MAGIC, off, len(dtype), len(shape)) + dtype + struct.pack(f"<{len(shape)}Q", *shape)
    return head.ljust(off, b"\0") + b"\1" * 64


@pytest.mark.parametrize(
    "dtype, shape",
    [
        (b"(,u1", (1,)),  # numpy's dtype parser raised SyntaxError
        (b"<u1", (1 << 32, 1 << 32)),  # numpy's int64 product wrapped to 0: reshape raised ValueError
        (b"<u1", (1 << 63, 2)),  # ValueError: maximum allowed dimension exceeded
        (b"<u1", (1,) * 65),  # more dimensions than numpy allows, all of size 1
        (b"S0", (1 << 40,)),  # zero-sized items: frombuffer refused the count
    ],
)
def test_decode_array_bad_header(dtype, shape):
    """fuzz target array_payload: decode_array let numpy's exceptions through (and the overflowed
    shape product slipped past its size check) instead of raising CodecError."""
    pytest.importorskip("numpy")
    from shmhub._native import Message
    from shmhub.codec import CodecError, decode_array

    data = _array_payload(dtype, shape)
    msg = Message(data, 0, len(data), "inline")
    with pytest.raises(CodecError):
        decode_array(msg)


@pytest.mark.parametrize("gen", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF])
def test_pool_pop_generation_past_2_31(gen):
    """make ubsan (-fno-wrapv) on the fuzz corpus: SlotPool.pop packed the new generation into a
    signed 64-bit result (gen << 32 | index), undefined for a generation of 2**31 or more. Under
    CPython's -fwrapv the result was negative, read as "class exhausted": the slot, already
    popped and marked Allocated, was lost, and alloc returned None. A slot reaches such a
    generation after 2**31 uses (hours for a hot slot in a small class)."""
    from shmhub import Segment, SegmentConfig
    from shmhub import layout as L

    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=256, size_classes=((64, 2),))
    with Segment.create(cfg) as seg:
        pool, meta = seg.pool, seg.layout.classes[0].meta_offset
        for s in range(2):
            seg.region.store_u32(meta + s * L.SLOT_META_SIZE + L.META_GENERATION, gen)
        expect = (gen + 1) & 0xFFFFFFFF
        a = pool.alloc(10, 1)
        b = pool.alloc_in_class(0, 1)
        assert a is not None and b is not None and a[3] == b[3] == expect
        assert pool.alloc(10, 1) is None  # now really exhausted
        pool.free(*a[:4], by=1)
        c = pool.wait_alloc(10, 1, 1.0)  # the futex-waiting path pops too
        assert c is not None and c[:3] == a[:3]
        pool.free(*b[:4], by=1)
        pool.free(*c[:4], by=1)
        assert pool.counts(0) == (2, 0)


def test_link_slot_send_generation_past_2_31():
    """The same through the link's native send path (c_pop_fit): a slot payload still goes out."""
    from shmhub import Segment, SegmentConfig
    from shmhub import layout as L
    from shmhub.link import GUEST, HOST, Link

    cfg = SegmentConfig(max_guests=1, bipbuf_capacity=256, inline_threshold=16, size_classes=((256, 2),))
    with Segment.create(cfg) as seg:
        meta = seg.layout.classes[0].meta_offset
        for s in range(2):
            seg.region.store_u32(meta + s * L.SLOT_META_SIZE + L.META_GENERATION, 0xFFFFFFF0)
        pid = seg.peers.attach()
        host, guest = Link(seg, pid, None, HOST), Link(seg, pid, None, GUEST)
        try:
            for i in range(4):
                guest.send(bytes([i]) * 100, timeout=5)
                with host.recv(timeout=5) as msg:
                    assert bytes(msg) == bytes([i]) * 100 and msg.tier == "slot"
        finally:
            guest.close()
            host.close()
        assert seg.pool.counts(0) == (2, 0)
