"""The sans-IO core: wire frames, call tables, error encoding and codecs, with bytes and lists only."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest

from shmhub import Message
from shmhub.errors import DeadlineExceeded, LinkCorrupted, MethodNotFound, RemoteError, RpcProtocolError
from shmhub.rpc import _wire as W
from shmhub.rpc._codec import BytesCodec, PickleCodec, codec_for
from shmhub.rpc._protocol import ERR_DEADLINE, ERR_NOT_FOUND, CallTable, FrameAssembler, ServingTable, decode_error, encode_error

from handlers import Boom, Unpicklable


def msg(b: bytes) -> Message:
    return Message(b, 0, len(b), "inline")


def test_frame_round_trips_every_field():
    f = W.encode_frame(
        W.Kind.REQUEST, 2**64 - 1, b"payload", flags=W.FLAG_STREAM, deadline_ns=123456789, arg=7, method="model.predict", buffers=[(0, 10), (64, 2**40)]
    )
    d = W.decode_frame(f, 1 << 20)
    assert (d.kind, d.call_id, d.flags, d.deadline_ns, d.arg, d.method, d.n_buffers) == (
        W.Kind.REQUEST,
        2**64 - 1,
        W.FLAG_STREAM,
        123456789,
        7,
        "model.predict",
        2,
    )
    assert d.descriptors == ((0, 10), (64, 2**40))
    assert f[d.payload_offset :] == b"payload"
    assert len(f) == W.HEADER_SIZE + len("model.predict") + 2 * W.DESCRIPTOR_SIZE + len(b"payload")


def test_response_fast_path_matches_the_general_encoding():
    f = W.encode_frame(W.Kind.RESULT, 5, b"xyz")
    assert f == W.HEADER.pack(W.VERSION, W.Kind.RESULT, 0, 0, 5, 0, 0, 0, 0) + b"xyz"
    d = W.decode_frame(f, 100)
    assert d.kind is W.Kind.RESULT and d.call_id == 5 and f[d.payload_offset :] == b"xyz"


def test_the_compiled_codec_follows_the_documented_layout():
    """The header is built and parsed in the compiled core; HEADER and DESCRIPTOR in _wire are its
    specification: random frames through both ways agree field by field (seeded)."""
    import random

    rnd = random.Random(7)
    for _ in range(2000):
        kind = rnd.choice(list(W.Kind))
        cid, dl, arg = rnd.randrange(2**64), rnd.choice([0, rnd.randrange(2**64)]), rnd.randrange(2**32)
        flags = rnd.choice([0, W.FLAG_STREAM])
        method = "".join(rnd.choice("abé.ü_") for _ in range(rnd.randrange(0, 20)))
        bufs = [(rnd.randrange(2**64), rnd.randrange(2**64)) for _ in range(rnd.randrange(0, 4))]
        payload = rnd.randbytes(rnd.randrange(0, 50))
        m = method.encode()
        want = W.HEADER.pack(W.VERSION, kind, flags, len(bufs), cid, dl, arg, len(m), 0) + m + b"".join(W.DESCRIPTOR.pack(*b) for b in bufs) + payload
        got = W.encode_frame(kind, cid, memoryview(payload), flags=flags, deadline_ns=dl, arg=arg, method=method, buffers=bufs)
        assert got == want
        d = W.decode_frame(msg(want), 1 << 20)
        got_fields = (d.kind, d.call_id, d.flags, d.deadline_ns, d.arg, d.method, d.n_buffers, d.descriptors)
        assert got_fields == (kind, cid, flags, dl, arg, method, len(bufs), tuple(bufs))
        assert want[d.payload_offset :] == payload


def test_the_encoder_refuses_what_the_decoder_would():
    with pytest.raises(ValueError, match="method name"):
        W.encode_frame(W.Kind.REQUEST, 1, method="x" * (W.MAX_METHOD_LEN + 1))
    with pytest.raises(ValueError, match="out-of-band buffers"):
        W.encode_frame(W.Kind.RESULT, 1, buffers=[(0, 1)] * (W.MAX_BUFFERS + 1))
    with pytest.raises(OverflowError):
        W.encode_frame(W.Kind.RESULT, -1)
    with pytest.raises(TypeError):
        W.encode_frame(W.Kind.RESULT, 1, "not a buffer")  # type: ignore[arg-type]


GOOD = W.encode_frame(W.Kind.REQUEST, 1, b"p", method="add", buffers=[(0, 4)])


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "truncated"),
        (GOOD[: W.HEADER_SIZE - 1], "truncated"),
        (GOOD[: W.HEADER_SIZE + 2], "truncated"),  # method name cut
        (bytes([2]) + GOOD[1:], "version"),
        (GOOD[:1] + bytes([0]) + GOOD[2:], "unknown frame kind 0"),
        (GOOD[:1] + bytes([99]) + GOOD[2:], "unknown frame kind 99"),
        (GOOD[:2] + struct.pack("<H", 0x80) + GOOD[4:], "unknown frame flags"),
        (GOOD[:4] + struct.pack("<I", W.MAX_BUFFERS + 1) + GOOD[8:], "oversize"),
        (GOOD[:28] + struct.pack("<H", W.MAX_METHOD_LEN + 1) + GOOD[30:], "oversize"),
        (GOOD[: W.HEADER_SIZE] + b"\xff\xfe\xfd" + GOOD[W.HEADER_SIZE + 3 :], "UTF-8"),
    ],
)
def test_malformed_frames_raise_one_typed_error(data, words):
    with pytest.raises(RpcProtocolError, match=words) as ei:
        W.decode_frame(data, 1 << 20)
    assert isinstance(ei.value, LinkCorrupted)


def test_oversize_frame_is_refused():
    with pytest.raises(RpcProtocolError, match="oversize"):
        W.decode_frame(GOOD, len(GOOD) - 1)
    W.decode_frame(GOOD, len(GOOD))


def test_assembler_waits_for_every_announced_buffer_and_checks_their_spans():
    a = FrameAssembler()
    f = W.encode_frame(W.Kind.RESULT, 3, b"p", buffers=[(0, 3), (2, 2)])
    assert a.feed(msg(f)) is None
    assert a.feed(msg(b"abc")) is None
    inc = a.feed(msg(b"xyzw"))
    assert inc is not None and [bytes(v) for v in inc.views()] == [b"abc", b"zw"]
    assert bytes(inc.payload()) == b"p"
    inc.release()
    assert inc.message.released
    # a buffer message shorter than its descriptor says is malformed; the frame is dropped whole
    assert a.feed(msg(f)) is None
    first = msg(b"abc")
    a.feed(first)
    short = msg(b"xyz")
    with pytest.raises(RpcProtocolError, match="outside its message"):
        a.feed(short)
    assert short.released and first.released
    # and the assembler is back at a frame boundary
    assert a.feed(msg(W.encode_frame(W.Kind.END, 1))) is not None


def test_call_ids_grow_and_responses_are_checked_against_them():
    t: CallTable[str] = CallTable()
    a, b, c = t.start("a"), t.start("b", deadline_ns=50), t.start("c", deadline_ns=10)
    assert (a, b, c) == (1, 2, 3) and len(t) == 3
    assert t.lookup_response(2) == "b"
    assert t.finish(2) == "b"
    assert t.lookup_response(2) is None  # late: dropped, not an error
    for never in (0, 4, 2**64 - 1):
        with pytest.raises(RpcProtocolError, match="never issued"):
            t.lookup_response(never)
    assert t.next_deadline() == 10
    assert t.expired(9) == []
    assert t.expired(60) == [(3, "c")]  # b was settled: its deadline entry is skipped
    assert t.next_deadline() is None
    assert t.drain() == [(1, "a")] and len(t) == 0


def test_quiet_calls_do_not_want_the_reader_and_leave_with_their_call():
    t: CallTable[str] = CallTable()
    a, b = t.start("a", quiet=True), t.start("b", deadline_ns=10, quiet=True)
    assert not t.wants_reader()
    c = t.start("c")
    assert t.wants_reader()
    t.finish(c)
    assert not t.wants_reader()
    assert t.want(a) and not t.want(a) and t.wants_reader()
    t.finish(a)
    assert t.expired(10) == [(b, "b")] and t.quiet == set() and not t.wants_reader()
    t.start("d", quiet=True)
    t.drain()
    assert t.quiet == set() and not t.want(4)


def test_serving_table_refuses_controls_for_calls_never_requested():
    s: ServingTable[str] = ServingTable()
    s.request(4, "x")
    with pytest.raises(RpcProtocolError, match="twice"):
        s.request(4, "y")
    with pytest.raises(RpcProtocolError):
        s.request(0, "z")
    assert s.control(W.Kind.CANCEL, 4) == "x"
    assert s.done(4) == "x"
    assert s.control(W.Kind.CANCEL, 3) is None  # finished or never seen below the max: ignored
    with pytest.raises(RpcProtocolError, match="never requested"):
        s.control(W.Kind.CREDIT, 5)


def _raised(exc):
    try:
        raise exc
    except BaseException as e:
        return e


def test_remote_exception_keeps_its_type_and_traceback_as_cause():
    e = decode_error(encode_error(_raised(Boom("bad")), PickleCodec()), PickleCodec())
    assert type(e) is Boom and e.args == ("bad",)
    assert "_raised" in str(e.__cause__) and "Boom: bad" in str(e.__cause__)


def test_unpicklable_exception_becomes_remote_error_with_its_text():
    e = decode_error(encode_error(_raised(Unpicklable("no")), PickleCodec()), PickleCodec())
    assert type(e) is RemoteError and e.type_name.endswith("Unpicklable") and e.message == "no"
    assert "_raised" in e.traceback
    assert pickle.loads(pickle.dumps(e)).traceback == e.traceback


def test_non_pickle_codecs_never_unpickle_errors():
    blob = encode_error(_raised(Boom("x")), PickleCodec())  # carries a pickle
    e = decode_error(blob, BytesCodec())
    assert type(e) is RemoteError and e.message == "x"


def test_not_found_and_deadline_codes():
    assert isinstance(decode_error(encode_error(LookupError("no method 'zap'"), PickleCodec(), ERR_NOT_FOUND), PickleCodec()), MethodNotFound)
    e = decode_error(encode_error(DeadlineExceeded("late"), PickleCodec(), ERR_DEADLINE), PickleCodec())
    assert isinstance(e, DeadlineExceeded) and isinstance(e, TimeoutError)
    with pytest.raises(RpcProtocolError):
        decode_error(b"\x00\x01", PickleCodec())
    with pytest.raises(RpcProtocolError):
        decode_error(struct.pack("<BIII", 0, 100, 0, 0), PickleCodec())


def test_pickle_codec_moves_big_buffers_out_of_band_only():
    c = PickleCodec(threshold=1000)
    small, big = np.arange(10.0), np.arange(1000.0)
    payload, oob = c.encode_call((small, big, b"x" * 2000, bytearray(3000), memoryview(b"y" * 5000)), {"k": b"z" * 10})
    assert [pb.raw().nbytes for pb in oob] == [8000, 2000, 3000, 5000]
    args, kwargs = c.decode_call(memoryview(payload), [pb.raw() for pb in oob])
    assert (args[0] == small).all() and (args[1] == big).all()
    assert type(args[2]) is bytes and args[2] == b"x" * 2000
    assert type(args[3]) is bytearray and isinstance(args[4], memoryview) and bytes(args[4]) == b"y" * 5000
    assert kwargs == {"k": b"z" * 10}


def test_pickle_codec_decodes_arrays_as_views_of_the_received_message():
    c = PickleCodec(threshold=64)
    payload, oob = c.encode(np.arange(100, dtype=np.int32))
    m = msg(oob[0].raw().tobytes())
    with m:
        view = memoryview(m)
        a = c.decode(memoryview(payload), [view])
        del view
    assert not m.released  # the array holds it
    assert a.base is not None and not a.flags.writeable and a.sum() == 4950
    del a
    assert m.released


def test_bytes_codec_carries_exactly_one_bytes_like_value():
    c = BytesCodec(threshold=16)
    p, oob = c.encode_call((b"abc",), {})
    assert c.decode_call(memoryview(p), []) == ((b"abc",), {})
    p, oob = c.encode(b"x" * 32)
    assert p == b"" and len(oob) == 1
    v = c.decode(memoryview(p), [oob[0].raw()])
    assert bytes(v) == b"x" * 32 and v.readonly
    with pytest.raises(TypeError):
        c.encode_call((1, 2), {})
    with pytest.raises(TypeError):
        c.encode({"no": "dicts"})


def test_codec_names():
    assert codec_for(None).name == "pickle" and codec_for("bytes").name == "bytes"
    with pytest.raises(ValueError, match="unknown codec"):
        codec_for("json")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=96), min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_any_bytes_either_parse_or_raise_the_protocol_error(chunks, rnd):
    """Fuzz: garbage, truncations and bit flips of valid frames never raise anything else."""
    valid = [
        W.encode_frame(W.Kind.REQUEST, 7, b"pp", method="m", buffers=[(0, 2)]),
        b"xy",
        W.encode_frame(W.Kind.RESULT, 7, b"r"),
        W.encode_frame(W.Kind.CREDIT, 7, arg=3),
    ]
    feed = []
    for c in chunks:
        if rnd.random() < 0.5:
            v = bytearray(rnd.choice(valid))
            if v and rnd.random() < 0.7:
                v[rnd.randrange(len(v))] ^= 1 << rnd.randrange(8)
            c = bytes(v[: rnd.randrange(len(v) + 1)]) if rnd.random() < 0.3 else bytes(v)
        feed.append(c)
    a = FrameAssembler(max_frame=200)
    for c in feed:
        try:
            inc = a.feed(msg(c))
        except RpcProtocolError:
            continue
        if inc is not None:
            try:
                decode_error(inc.payload(), PickleCodec())
            except RpcProtocolError:
                pass
            inc.release()
