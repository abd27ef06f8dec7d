"""numpy arrays over links: a small header, then the data 64-byte aligned in shared memory.

Payload layout: magic "SHNDARR1", u32 data_offset, u16 dtype-string length, u16 ndim, the dtype
string (numpy's dtype.str), ndim u64 dimensions, padding, data (C order) at data_offset."""

from __future__ import annotations

import struct
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from ._native import Message
from .errors import ShmhubError

if TYPE_CHECKING:
    import numpy as _numpy
    import numpy.typing as npt

    from .link import Link

ARRAY_MAGIC = b"SHNDARR1"
_HEAD = struct.Struct("<8sIHH")
ALIGN = 64
PAGE = 4096
BIG = 64 << 10  # arrays from this size on get their data placed within a page (see _slack)


class CodecError(ShmhubError, ValueError):
    """A payload is not what the decoder expects (e.g. not an array header)."""


def _np() -> ModuleType:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is an optional extra
        raise ImportError("numpy is required for array helpers: pip install 'shmhub[numpy]'") from None
    return numpy


def _header(dtype: _numpy.dtype[Any], shape: Sequence[int]) -> bytes:
    if dtype.hasobject:
        raise CodecError(f"dtype {dtype} holds Python objects and cannot be sent as raw memory")
    ds: bytes = dtype.str.encode()
    return _HEAD.pack(ARRAY_MAGIC, 0, len(ds), len(shape)) + ds + struct.pack(f"<{len(shape)}Q", *shape)


def _address(np: ModuleType, buf: Message) -> int:
    address: int = np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    return address


def _slack(nbytes: int) -> int:
    """Room reserved beyond header and data for placing the data."""
    return PAGE if nbytes >= BIG else ALIGN


def _write_header(np: ModuleType, buf: Message, head: bytes, off: Optional[int] = None, phase: int = 0, nbytes: int = 0) -> int:
    """Write the header; returns the data offset. The data is ALIGN-aligned; a big array's data
    starts `phase` bytes into a page. A copy runs at full speed only when its destination sits
    at or a little before its source's offset within a page: just after it, the stores alias the
    loads running ahead (4K aliasing; 3.5x slower measured here for 256 MiB)."""
    if off is None:
        base = _address(np, buf) + len(head)
        off = len(head) + ((phase - base) % PAGE if nbytes >= BIG else (-base) % ALIGN)
    with memoryview(buf) as view:
        view[: len(head)] = head
        struct.pack_into("<I", view, 8, off)
    return off


def empty(link: Link, shape: Union[int, Sequence[int]], dtype: npt.DTypeLike = "float64") -> npt.NDArray[Any]:
    np = _np()
    dt: _numpy.dtype[Any] = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(x) for x in shape)
    head = _header(dt, shape)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dt.itemsize
    buf = link.reserve(len(head) + _slack(nbytes) + nbytes)
    off = _write_header(np, buf, head, nbytes=nbytes)  # page-aligned when big
    # The array's base is the reserved buffer: send_array finds it there. An array dropped unsent
    # gives it back through the collector, which is how arrays end: no ResourceWarning.
    buf.owned_by_views = True
    array: npt.NDArray[Any] = np.frombuffer(buf, dtype=dt, count=count, offset=off).reshape(shape)
    return array


def _reserved_owner(a: object) -> Optional[Message]:
    base: object = a
    while base is not None and not isinstance(base, Message):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return base


def send_array(link: Link, a: npt.ArrayLike, timeout: Optional[float] = None) -> None:
    np = _np()
    arr: npt.NDArray[Any] = np.asarray(a)
    head = _header(arr.dtype, arr.shape)
    buf = _reserved_owner(a)
    if buf is not None and buf.token is not None and buf.token[0] is link and arr.flags.c_contiguous:
        with memoryview(buf) as view:
            off = struct.unpack_from("<I", view, 8)[0]
        if arr.__array_interface__["data"][0] == _address(np, buf) + off and len(head) <= off:
            _write_header(np, buf, head, off)  # the array may have been reshaped since empty()
            link.send_reserved(buf, off + arr.nbytes, timeout)  # zero copy
            return
    out = link.reserve(len(head) + _slack(arr.nbytes) + arr.nbytes, timeout)
    try:
        phase = (arr.__array_interface__["data"][0] % PAGE) // ALIGN * ALIGN  # at or just before the source's
        off = _write_header(np, out, head, phase=phase, nbytes=arr.nbytes)
        dst = np.frombuffer(out, dtype=arr.dtype, count=arr.size, offset=off).reshape(arr.shape)
        np.copyto(dst, arr, casting="no")  # the one memcpy
        del dst
        link.send_reserved(out, off + arr.nbytes, timeout)
    except BaseException:
        if out.token is not None:
            out.release()
        raise


def recv_array(link: Link, timeout: Optional[float] = None) -> npt.NDArray[Any]:
    return decode_array(link.recv(timeout))


def decode_array(msg: Message) -> npt.NDArray[Any]:
    """A read-only ndarray viewing the message; the message is released when the array goes.
    A payload that is not a well-formed array header raises CodecError (the message is released)."""
    np = _np()
    try:
        with memoryview(msg) as view:
            if len(view) < _HEAD.size or bytes(view[:8]) != ARRAY_MAGIC:
                raise CodecError("payload is not an array sent with send_array")
            _, off, dlen, ndim = _HEAD.unpack_from(view)
            meta = bytes(view[_HEAD.size : _HEAD.size + dlen + 8 * ndim])
        dtype = np.dtype(meta[:dlen].decode())
        shape = struct.unpack_from(f"<{ndim}Q", meta, dlen)
        count = 1
        for n in shape:  # Python ints: a product numpy would wrap around at 2**63 cannot pass the check below
            count *= n
        if dtype.hasobject or off > len(msg) or count * dtype.itemsize > len(msg) - off:
            raise CodecError("array header does not match the payload")
        arr: npt.NDArray[Any] = np.frombuffer(msg, dtype=dtype, count=count, offset=off).reshape(shape)
    except CodecError:
        msg.release()
        raise
    except Exception as e:  # the header's numbers and dtype string come from the peer: numpy's parser
        msg.release()  # raises TypeError, ValueError, even SyntaxError; reshape refuses > 64 dimensions
        raise CodecError(f"bad array header: {type(e).__name__}: {e}") from None
    with msg:  # released when the array, its last view, goes (not by the collector)
        return arr
