"""Write the hand-made seeds of each fuzz target (valid inputs of every kind) to corpus/<target>/.

    python tests/fuzz/make_seeds.py

The committed corpus is these seeds plus what `make fuzz-merge` kept from long runs (inputs that
reached new coverage, minimized by libFuzzer's -merge=1).
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def seeds() -> Dict[str, List[bytes]]:
    from shmhub import bootstrap
    from shmhub import layout as L
    from shmhub._native import Region, Ring, encode_inline, encode_mmap_ref, encode_slot_ref
    from shmhub.http._meta import RequestMeta, ResponseMeta, encode_request, encode_response
    from shmhub.rpc._codec import BytesCodec
    from shmhub.rpc._protocol import encode_error
    from shmhub.rpc._wire import Kind, encode_frame

    out: Dict[str, List[bytes]] = {}
    out["frame"] = [
        encode_inline(b"abc"),
        encode_inline(b"legacy!", legacy=True),
        encode_slot_ref(1, 2, 3, 4),
        encode_mmap_ref(1, 2, 4096, 100),
        encode_inline(b""),
    ]

    fd = os.memfd_create("seed", os.MFD_CLOEXEC)
    os.ftruncate(fd, 4096)
    region = Region(fd, 4096, True)
    try:
        region.store_u32(L.RING_CAPACITY, 256)
        ring = Ring(region, 0)
        ring.send_inline(b"first", False)
        ring.write_slot_ref(0, 0, 1, 1)
        ring.send_inline(b"x" * 100, False)
        ring.recv_inline()
        ring.read_frame()
        ring.release(L.SLOT_REF_FRAME_SIZE)
        ring.send_inline(b"y" * 100, False)  # wraps: a watermark
        image = bytes(region.read(0, L.RING_HEADER_SIZE + 256))
    finally:
        region.close()
        os.close(fd)
    out["ring"] = [
        bytes([0, 1, 2, 3, 4, 0x35, 0x46, 7, 0x18, 9, 10, 11, 12, 13, 0, 1]) + image,
        bytes([2] * 16) + image,
        bytes([0x55, 0x66, 0x88] * 5 + [0]) + image,
    ]

    out["segment"] = [b"", b"\x00" + struct.pack("<HB", L.HDR_FEATURES, 1) + b"\x00", b"\x80" + L.MAGIC + struct.pack("<II", 7, 128)]

    mp = L.MAP_MAGIC + struct.pack("<IIII", 1, 1, 0, 0)
    attach = struct.pack("<IIQ", 1, 1, 8192)
    out["mmap_attach"] = [
        b"\x00" + bytes([16]) + attach + b"\x01\x02" + mp + struct.pack("<IIQI", 1, 1, 4096, 100),
        b"\x01" + bytes([16]) + attach + b"\x01\x02" + mp + bytes([16]) + attach + b"\x01\x02" + mp,
    ]

    ok = bootstrap.encode_response(L.BOOTSTRAP_STATUS_OK, 3, "")
    err = bootstrap.encode_response(L.BOOTSTRAP_STATUS_ERROR, 0, "no room")
    out["bootstrap_msgs"] = [
        b"\x01" + L.BOOTSTRAP_REQUEST,
        b"\x01RSH0\x00\x01x",
        b"\x00" + b"\0" * 4 + err,
        b"\x08" + b"\x04" + bytes([5, 5, 6, 6]) + bytes([5, 0, 6, 6]) + ok,
    ]

    def msgs(*parts: bytes) -> bytes:
        return b"".join(struct.pack("<H", len(p)) + p for p in parts)

    codec = BytesCodec()
    out["rpc"] = [
        msgs(encode_frame(Kind.REQUEST, 1, b"args", method="echo", deadline_ns=5)),
        msgs(encode_frame(Kind.RESULT, 1, b"result")),
        msgs(encode_frame(Kind.REQUEST, 2, b"", method="m", buffers=((0, 4), (2, 2))), b"abcd", b"efgh"),
        msgs(encode_frame(Kind.ERROR, 3, encode_error(ValueError("bad"), codec))),
        msgs(encode_frame(Kind.CREDIT, 4, arg=8), encode_frame(Kind.END, 4), encode_frame(Kind.CANCEL, 5)),
    ]

    req = RequestMeta("GET", "/a", b"/a", b"q=1", ((b"host", b"x"),), "/a", (("k", "v"),), "", "https", "1.1", ("127.0.0.1", 5), ("::1", 80))
    req2 = RequestMeta("PATCH", "/", b"/", b"", (), "", (), "/root", "http", "2", None, None)
    out["http_meta"] = [
        b"\x00" + encode_request(req),
        b"\x00" + encode_request(req2),
        b"\x01" + encode_response(ResponseMeta(200, ((b"content-type", b"text/plain"),))),
    ]

    att = struct.pack("<BQ", 1, 2)
    out["executor_fds"] = [
        b"\x00" + bytes([9]) + att + b"\x01" + b"\x02" + b"\x01\x10\x01\x02u1" + b"\x00\x00",
        b"\x01" + bytes([9]) + att + b"\x01" + bytes([9]) + struct.pack("<BQ", 2, 2) + b"\x00\x02",
    ]
    from shmhub.codec import _HEAD, ARRAY_MAGIC

    def arr(dtype: bytes, shape: tuple, body: bytes) -> bytes:
        head = _HEAD.pack(ARRAY_MAGIC, 64, len(dtype), len(shape)) + dtype + struct.pack(f"<{len(shape)}Q", *shape)
        return head.ljust(64, b"\0") + body

    out["array_payload"] = [
        arr(b"<f8", (2, 3), bytes(48)),
        arr(b"|u1", (), b"\x07"),
        arr(b"<i4", (0, 5), b""),
        arr(b"[('a', '<u2'), ('b', '|u1')]", (2,), bytes(6)),
    ]
    from shmhub.remote._wire import Control
    from shmhub.remote._wire import Kind as RKind
    from shmhub.remote._wire import encode as rencode

    out["remote_wire"] = [
        rencode(Control(RKind.HELLO, pid=42, text="guest")),
        rencode(Control(RKind.WELCOME, port=5555)),
        rencode(Control(RKind.BYE)),
        rencode(Control(RKind.REFUSE, text="full")),
    ]
    return out


def main() -> None:
    sys.path.insert(0, HERE)
    only = sys.argv[1:]
    for name, items in seeds().items():
        if only and name not in only:
            continue
        d = os.path.join(CORPUS, name)
        os.makedirs(d, exist_ok=True)
        for data in items:
            with open(os.path.join(d, "seed-" + hashlib.sha1(data).hexdigest()[:16]), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
