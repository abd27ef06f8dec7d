"""A worker that breaks the protocol on some paths (the front must survive it):
/malformed: response metadata that does not decode; /badshape: a stream item of the wrong shape;
/unknown-id: an RPC result for a call id the front never issued. Other paths: the Starlette app."""

from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import shmhub  # noqa: E402
from shmhub import rpc  # noqa: E402
from shmhub.http._meta import decode_request  # noqa: E402
from shmhub.http._worker import AsgiWorker  # noqa: E402
from shmhub.rpc import _wire  # noqa: E402
from apps.star import app  # noqa: E402


class Rogue(AsgiWorker):
    def __init__(self, link: shmhub.Link) -> None:
        super().__init__(app)
        self.link = link

    async def http(self, rid: int, meta: bytes, body: Any, more: bool, deadline_ns: int = 0) -> Any:
        path = decode_request(meta).path
        if path == "/malformed":
            return (b"\x01\x02garbage", b"", False)
        if path == "/badshape":
            return "not a tuple"
        if path == "/unknown-id":
            self.link.send(_wire.encode_frame(_wire.Kind.RESULT, 999_999_999, b"\x80\x05N."), timeout=5.0)
        return await super().http(rid, meta, body, more, deadline_ns)


link = shmhub.connect()
try:
    rpc.serve(link, Rogue(link))
finally:
    link.close()
