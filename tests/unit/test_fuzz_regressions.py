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


@pytest.mark.parametrize("dtype, shape", [
    (b"(,u1", (1,)),  # numpy's dtype parser raised SyntaxError
    (b"<u1", (1 << 32, 1 << 32)),  # numpy's int64 product wrapped to 0: reshape raised ValueError
    (b"<u1", (1 << 63, 2)),  # ValueError: maximum allowed dimension exceeded
    (b"<u1", (1,) * 65),  # more dimensions than numpy allows, all of size 1
    (b"S0", (1 << 40,)),  # zero-sized items: frombuffer refused the count
])
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
