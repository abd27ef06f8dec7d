"""The RPC protocol state, with no I/O, no threads, no clock and no shared memory: the caller
feeds received messages and passes the time, in the manner of h11.

    FrameAssembler  received messages -> Incoming (a header frame with its out-of-band buffers)
    CallTable       the calls this end issued: ids, deadlines, which ids were ever issued
    ServingTable    the calls this end serves: which ids were seen, which are running
    encode_error / decode_error   exceptions on the wire, whatever the codec

Every malformed input raises RpcProtocolError (a LinkCorrupted): anything else is a bug."""

from __future__ import annotations

import heapq
import pickle
import struct
import traceback
from typing import TYPE_CHECKING, Any, Dict, Generic, List, Optional, Sequence, Set, Tuple, TypeVar

from ..errors import DeadlineExceeded, MethodNotFound, RemoteError, RpcProtocolError
from ._codec import Codec
from ._wire import Frame, Kind, decode_frame

if TYPE_CHECKING:
    pass

__all__ = [
    "Incoming",
    "FrameAssembler",
    "CallTable",
    "ServingTable",
    "encode_error",
    "decode_error",
    "ERR_EXCEPTION",
    "ERR_NOT_FOUND",
    "ERR_DEADLINE",
    "ERR_HEADER",
    "DEFAULT_MAX_FRAME",
]

DEFAULT_MAX_FRAME = 1 << 30  # a header message (in-band payload) larger than this is an oversize frame

T = TypeVar("T")


class Incoming:
    """A complete frame: its header message and the messages of its out-of-band buffers.
    The receiver owns the messages: views() exposes them, release() gives them back."""

    __slots__ = ("frame", "message", "buffers")

    def __init__(self, frame: Frame, message: Any) -> None:
        self.frame = frame
        self.message = message  # the header message (a Message, or any buffer)
        self.buffers: List[Any] = []

    def payload(self) -> memoryview:
        with memoryview(self.message) as mv:
            return mv[self.frame.payload_offset :]

    def views(self) -> List[memoryview]:
        """Zero-copy views of the out-of-band buffers (each one's exporter is its message, which
        stays alive while any view of it does)."""
        if not self.buffers:
            return _NO_VIEWS
        out = []
        for (off, n), msg in zip(self.frame.descriptors, self.buffers):
            with memoryview(msg) as whole:
                out.append(whole[off : off + n])
        return out

    def release(self) -> None:
        """Give every message back once no view is left (a message still viewed is released with
        its last view: a Message's with-block semantics)."""
        _release(self.message)
        if self.buffers:
            for msg in self.buffers:
                _release(msg)
            self.buffers = []


_NO_VIEWS: List[memoryview] = []


def _release(msg: Any) -> None:
    """Release a received message now, or with its last view (a Message's with-block exit)."""
    exit_ = getattr(msg, "__exit__", None)
    if exit_ is not None:
        exit_(None, None, None)


class FrameAssembler:
    """Feed every received message in order; get an Incoming once a frame and all its buffers
    have arrived. A header frame announcing n buffers takes the next n messages as those buffers."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._partial: Optional[Incoming] = None

    def feed(self, msg: Any) -> Optional[Incoming]:
        part = self._partial
        if part is not None:
            off, n = part.frame.descriptors[len(part.buffers)]
            size = len(memoryview(msg)) if not hasattr(msg, "nbytes") else msg.nbytes
            if off + n > size:
                _release(msg)
                self._partial = None
                part.release()
                raise RpcProtocolError(f"out-of-band buffer [{off}, {off + n}) outside its message of {size} bytes")
            part.buffers.append(msg)
            if len(part.buffers) == len(part.frame.descriptors):
                self._partial = None
                return part
            return None
        try:
            frame = decode_frame(msg, self.max_frame)
        except RpcProtocolError:
            _release(msg)
            raise
        inc = Incoming(frame, msg)
        if frame.descriptors:
            self._partial = inc
            return None
        return inc

    def reset(self) -> None:
        """Drop a partly received frame (the connection ended)."""
        if self._partial is not None:
            self._partial.release()
            self._partial = None


class CallTable(Generic[T]):
    """Calls this end issued, by id; `T` is whatever the driver resolves (a future). Ids start at 1
    and only grow, so a response naming an id never issued is a protocol error while one naming an
    id already settled (cancelled, expired) is a late response, to drop."""

    def __init__(self) -> None:
        self._next = 1
        self.pending: Dict[int, T] = {}
        self._deadlines: List[Tuple[int, int]] = []  # heap of (deadline_ns, call_id)
        # Pending calls whose caller will read their response itself (see wants_reader); a subset
        # of pending, kept so by every removal below.
        self.quiet: Set[int] = set()

    def __len__(self) -> int:
        return len(self.pending)

    def start(self, call: T, deadline_ns: int = 0, quiet: bool = False) -> int:
        cid = self._next
        self._next += 1
        self.pending[cid] = call
        if quiet:
            self.quiet.add(cid)
        if deadline_ns:
            dl = self._deadlines
            if len(dl) > 2 * len(self.pending) + 64:
                # Settled calls' entries are dropped lazily: rebuilt now and then, the heap stays
                # O(pending) whatever the deadlines (amortised O(1) per call).
                dl[:] = [e for e in dl if e[1] in self.pending]
                heapq.heapify(dl)
            heapq.heappush(dl, (deadline_ns, cid))
        return cid

    def get(self, cid: int) -> Optional[T]:
        return self.pending.get(cid)

    def finish(self, cid: int) -> Optional[T]:
        """Forget a call (settled); returns it, or None if it was already gone."""
        self.quiet.discard(cid)
        return self.pending.pop(cid, None)

    def wants_reader(self) -> bool:
        """Whether a pending call's response may arrive with nobody reading for it: some call
        is not quiet."""
        return len(self.pending) > len(self.quiet)

    def want(self, cid: int) -> bool:
        """The call is quiet no more; True if it was."""
        if cid in self.quiet:
            self.quiet.discard(cid)
            return True
        return False

    def want_all(self) -> bool:
        """No call is quiet any more; True if one was."""
        was = bool(self.quiet)
        self.quiet.clear()
        return was

    def lookup_response(self, cid: int) -> Optional[T]:
        """The call a response names; None for a late response; RpcProtocolError for an id never issued."""
        if not 0 < cid < self._next:
            raise RpcProtocolError(f"response for call id {cid}, which was never issued (last issued {self._next - 1})")
        return self.pending.get(cid)

    def next_deadline(self) -> Optional[int]:
        """The earliest deadline of a pending call (ns), dropping entries of settled calls."""
        dl = self._deadlines
        while dl and dl[0][1] not in self.pending:
            heapq.heappop(dl)
        return dl[0][0] if dl else None

    def expired(self, now_ns: int) -> List[Tuple[int, T]]:
        """Remove and return the pending calls whose deadline is at or before now_ns."""
        out = []
        dl = self._deadlines
        while dl and dl[0][0] <= now_ns:
            _, cid = heapq.heappop(dl)
            self.quiet.discard(cid)
            call = self.pending.pop(cid, None)
            if call is not None:
                out.append((cid, call))
        return out

    def drain(self) -> List[Tuple[int, T]]:
        """Remove and return every pending call (the connection ended)."""
        out = list(self.pending.items())
        self.pending.clear()
        self.quiet.clear()
        self._deadlines.clear()
        return out


class ServingTable(Generic[T]):
    """Calls this end serves, by the caller's id; `T` is the driver's per-call state. A CANCEL or
    CREDIT may name a call that finished (ignored), never one not yet requested."""

    def __init__(self) -> None:
        self.max_seen = 0
        self.active: Dict[int, T] = {}

    def request(self, cid: int, state: T) -> None:
        if cid in self.active:
            raise RpcProtocolError(f"call id {cid} requested twice while it runs")
        if cid == 0:
            raise RpcProtocolError("call id 0 is never issued")
        self.max_seen = max(self.max_seen, cid)
        self.active[cid] = state

    def control(self, kind: Kind, cid: int) -> Optional[T]:
        """The call a CANCEL / CREDIT names, or None if it already finished."""
        if not 0 < cid <= self.max_seen:
            raise RpcProtocolError(f"{kind.name} for call id {cid}, which was never requested")
        return self.active.get(cid)

    def done(self, cid: int) -> Optional[T]:
        return self.active.pop(cid, None)

    def drain(self) -> List[T]:
        out = list(self.active.values())
        self.active.clear()
        return out


# -- exceptions on the wire -------------------------------------------------------------------

ERR_EXCEPTION = 0  # a handler raised
ERR_NOT_FOUND = 1  # no handler of that name
ERR_DEADLINE = 2  # the call's deadline passed before it started (or while it ran)
ERR_HEADER = struct.Struct("<BIII")  # code, then lengths of type name, message, traceback (UTF-8); pickle follows


class _RemoteTraceback(Exception):
    """The remote traceback, attached as __cause__ (as concurrent.futures.process does)."""

    def __init__(self, tb: str) -> None:
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(exc: BaseException, tb: str) -> BaseException:
    if tb:
        exc.__cause__ = _RemoteTraceback(f'\n"""\n{tb}"""')
    return exc


def encode_error(exc: BaseException, codec: Codec, code: int = ERR_EXCEPTION) -> bytes:
    """An exception as an ERROR payload: type name, message and traceback text always, the
    exception itself pickled too when the codec carries Python objects and it pickles."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if exc.__traceback__ else ""
    tname = type(exc).__qualname__
    if type(exc).__module__ not in ("builtins", "__main__"):
        tname = f"{type(exc).__module__}.{tname}"
    try:
        msg = str(exc)
    except Exception:  # a broken __str__ must not lose the error
        msg = "<unprintable>"
    blob = b""
    if codec.pickles_exceptions and code == ERR_EXCEPTION:
        try:
            blob = pickle.dumps(exc.with_traceback(None), 5)
        except Exception:
            blob = b""  # sent as RemoteError fields
    t, m, b = tname.encode(), msg.encode("utf-8", "replace"), tb.encode("utf-8", "replace")
    return b"".join((ERR_HEADER.pack(code, len(t), len(m), len(b)), t, m, b, blob))


def decode_error(payload: Sequence[int] | memoryview, codec: Codec) -> BaseException:
    """Rebuild an exception from an ERROR payload (RpcProtocolError if malformed)."""
    mv = memoryview(payload)  # type: ignore[arg-type]
    if mv.nbytes < ERR_HEADER.size:
        raise RpcProtocolError("truncated ERROR payload")
    code, lt, lm, lb = ERR_HEADER.unpack_from(mv)
    end = ERR_HEADER.size + lt + lm + lb
    if end > mv.nbytes:
        raise RpcProtocolError("truncated ERROR payload")
    o = ERR_HEADER.size
    tname = bytes(mv[o : o + lt]).decode("utf-8", "replace")
    msg = bytes(mv[o + lt : o + lt + lm]).decode("utf-8", "replace")
    tb = bytes(mv[o + lt + lm : end]).decode("utf-8", "replace")
    if code == ERR_NOT_FOUND:
        return MethodNotFound("MethodNotFound", msg)
    if code == ERR_DEADLINE:
        return DeadlineExceeded(msg)
    if end < mv.nbytes and codec.pickles_exceptions:
        try:
            exc = pickle.loads(mv[end:])
        except Exception:
            exc = None
        if isinstance(exc, BaseException):
            return _rebuild(exc, tb)
    return RemoteError(tname, msg, tb)
