"""Request/response over links: calls with many in flight, deadlines, cancellation, remote
errors, streaming and zero-copy pickle-5 buffers, from threads or asyncio (docs/rpc.md).

    rpc.serve(shmhub.connect(), {"add": add})       # a guest serves
    client = rpc.Client(guest.link)                  # the host calls
    client.call("add", 1, 2, timeout=1.0)            # -> 3

The protocol runs over any object with the Link's send/recv surface (_protocol.py is sans-IO)."""

from __future__ import annotations

from ..errors import DeadlineExceeded, MethodNotFound, RemoteError, RpcError, RpcProtocolError
from ._client import Client, Stream
from ._codec import BytesCodec, Codec, MsgspecCodec, PickleCodec
from ._server import Server, aserve, cancelled, inline, serve

__all__ = [
    "BytesCodec",
    "Client",
    "Codec",
    "DeadlineExceeded",
    "MethodNotFound",
    "MsgspecCodec",
    "PickleCodec",
    "RemoteError",
    "RpcError",
    "RpcProtocolError",
    "Server",
    "Stream",
    "aserve",
    "cancelled",
    "inline",
    "serve",
]
