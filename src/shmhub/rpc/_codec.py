"""Codecs turn call arguments and results into (payload, out-of-band buffers) and back.

PickleCodec (default): pickle protocol 5; buffers at or above `threshold` bytes (numpy arrays,
bytearrays, memoryviews, Messages, top-level bytes) leave the pickle stream and travel as
messages of their own; on receipt they are handed to pickle as views of the received Message,
so a numpy array comes back as a read-only view of shared memory that keeps its slot or mapping
alive exactly as long as it lives. Pickle runs code chosen by the sender: only for trusted peers.

BytesCodec: one bytes-like argument and a bytes-like result, no pickle. MsgspecCodec: msgpack
through msgspec (optional dependency). Neither executes code from the peer."""

from __future__ import annotations

import copyreg
import io
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._native import Message

__all__ = ["Codec", "PickleCodec", "BytesCodec", "MsgspecCodec", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 64 << 10

Encoded = Tuple[bytes, List[pickle.PickleBuffer]]


class Codec:
    """Contract: encode(obj) -> (payload, out-of-band buffers); decode(payload, views) -> obj.
    `pickles_exceptions`: remote exceptions travel pickled (else as RemoteError fields)."""

    name = "codec"
    pickles_exceptions = False

    def __init__(self, threshold: int = DEFAULT_THRESHOLD) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1 byte")
        self.threshold = threshold

    def encode_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Encoded:
        raise NotImplementedError

    def decode_call(self, payload: memoryview, views: Sequence[memoryview]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        raise NotImplementedError

    def encode(self, obj: Any) -> Encoded:
        raise NotImplementedError

    def decode(self, payload: memoryview, views: Sequence[memoryview]) -> Any:
        raise NotImplementedError


class _OOBBytes:
    """A top-level bytes or bytearray argument or result at or above the threshold: pickle writes
    these types in-band without asking any reducer, so they are wrapped to travel out of band
    (rebuilt as the same type: one copy on receipt)."""

    __slots__ = ("data",)

    def __init__(self, data: "bytes | bytearray") -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
        return type(self.data), (pickle.PickleBuffer(self.data),)


_BYTES = (bytes, bytearray)
# Types that never export a buffer to pickle (small bytes go in-band anyway): encoded without a
# buffer callback, the common case of small arguments and results.
_PLAIN = frozenset((type(None), bool, int, float, str))


def _as_view(buf: Any) -> memoryview:
    return buf if isinstance(buf, memoryview) else memoryview(buf)


def _reduce_view(obj: Any) -> Tuple[Callable[..., Any], Tuple[Any, ...]]:
    mv = memoryview(obj)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    return _as_view, (pickle.PickleBuffer(mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv),)


_VIEW_TABLE = copyreg.dispatch_table.copy()
_VIEW_TABLE[memoryview] = _reduce_view
_VIEW_TABLE[Message] = _reduce_view


class PickleCodec(Codec):
    """pickle protocol 5 with out-of-band buffers (trusted peers only)."""

    name = "pickle"
    pickles_exceptions = True

    def _wrap(self, obj: Any) -> Any:
        return _OOBBytes(obj) if type(obj) in _BYTES and len(obj) >= self.threshold else obj

    def encode_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Encoded:
        if not kwargs:
            for a in args:
                if type(a) not in _PLAIN:
                    break
            else:  # nothing that could leave the stream: no buffer callback to set up
                return pickle.dumps((args, None), 5), []
        t = self.threshold
        for a in args:
            if type(a) in _BYTES and len(a) >= t:
                args = tuple(self._wrap(a) for a in args)
                break
        if kwargs:
            kwargs = {k: self._wrap(v) for k, v in kwargs.items()}
        return self.encode((args, kwargs or None))

    def decode_call(self, payload: memoryview, views: Sequence[memoryview]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args, kwargs = self.decode(payload, views)
        return args, kwargs or {}

    def encode(self, obj: Any) -> Encoded:
        if type(obj) in _PLAIN:
            return pickle.dumps(obj, 5), []
        if type(obj) in _BYTES and len(obj) >= self.threshold:
            obj = _OOBBytes(obj)
        oob: List[pickle.PickleBuffer] = []
        threshold = self.threshold

        def keep(pb: pickle.PickleBuffer) -> bool:
            # True: in-band (small); False: out of band
            with pb.raw() as m:
                if m.nbytes >= threshold:
                    oob.append(pb)
                    return False
            return True

        cls = self.pickler_class()
        if cls is None:
            try:
                return pickle.dumps(obj, 5, buffer_callback=keep), oob
            except TypeError:
                # memoryviews and Messages do not pickle by themselves: retry with reducers for them
                # (a slower Pickler, so only when needed)
                oob.clear()
                cls = pickle.Pickler
        f = io.BytesIO()
        p = cls(f, 5, buffer_callback=keep)
        p.dispatch_table = _VIEW_TABLE
        p.dump(obj)
        return f.getvalue(), oob

    def pickler_class(self) -> "Optional[type[pickle.Pickler]]":
        """A Pickler subclass to encode with (e.g. one with reducer_override), or None for the
        fast pickle.dumps."""
        return None

    def decode(self, payload: memoryview, views: Sequence[memoryview]) -> Any:
        return pickle.loads(payload, buffers=views)


class BytesCodec(Codec):
    """One bytes-like argument, a bytes-like result; nothing is unpickled. Payloads below the
    threshold arrive as bytes, larger ones as read-only memoryviews of shared memory."""

    name = "bytes"

    def encode_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Encoded:
        if kwargs or len(args) != 1:
            raise TypeError("the bytes codec carries exactly one positional bytes-like argument")
        return self.encode(args[0])

    def decode_call(self, payload: memoryview, views: Sequence[memoryview]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        return (self.decode(payload, views),), {}

    def encode(self, obj: Any) -> Encoded:
        if obj is None:
            obj = b""
        try:
            mv = memoryview(obj)
        except TypeError:
            raise TypeError(f"the bytes codec carries bytes-like objects, not {type(obj).__name__}") from None
        if mv.nbytes >= self.threshold:
            return b"", [pickle.PickleBuffer(mv if mv.c_contiguous else mv.tobytes())]
        return mv.tobytes(), []

    def decode(self, payload: memoryview, views: Sequence[memoryview]) -> Any:
        if views:
            return views[0].toreadonly()
        return bytes(payload)


class MsgspecCodec(Codec):
    """msgpack through msgspec: plain data only (no code runs on decode)."""

    name = "msgspec"

    def __init__(self, threshold: int = DEFAULT_THRESHOLD) -> None:
        super().__init__(threshold)
        try:
            import msgspec
        except ImportError:  # optional extra
            raise ImportError("MsgspecCodec needs msgspec: pip install 'shmhub[rpc-msgspec]'") from None
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder()

    def encode_call(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Encoded:
        return self._enc.encode((args, kwargs or None)), []

    def decode_call(self, payload: memoryview, views: Sequence[memoryview]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args, kwargs = self._dec.decode(payload)
        return tuple(args), kwargs or {}

    def encode(self, obj: Any) -> Encoded:
        return self._enc.encode(obj), []

    def decode(self, payload: memoryview, views: Sequence[memoryview]) -> Any:
        return self._dec.decode(payload)


def codec_for(spec: "Optional[Codec | str]") -> Codec:
    """A codec from an instance or a name ("pickle", "bytes", "msgspec")."""
    if spec is None:
        return PickleCodec()
    if isinstance(spec, Codec):
        return spec
    table = {"pickle": PickleCodec, "bytes": BytesCodec, "msgspec": MsgspecCodec}
    try:
        return table[spec]()
    except KeyError:
        raise ValueError(f"unknown codec {spec!r}: one of {sorted(table)} or a Codec instance") from None
