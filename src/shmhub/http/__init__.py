"""HTTP over the hub: a front running uvicorn whose ASGI app (the gateway) sends each request over
shmhub.rpc to the least-loaded of N worker guests running the user's ASGI or WSGI app (docs/http.md).

    shmhub serve myapp:app --workers 4 --bind 127.0.0.1:8000
    shmhub.http.serve("myapp:app", workers=4, bind="127.0.0.1:8000")"""

from __future__ import annotations

from ..errors import HttpError, HttpProtocolError
from ._gateway import Gateway, request_meta
from ._meta import Method, RequestMeta, ResponseMeta, decode_request, decode_response, encode_request, encode_response
from ._pool import QueueFull, Worker, WorkerPool, worker_command
from ._serve import serve

__all__ = [
    "Gateway",
    "HttpError",
    "HttpProtocolError",
    "Method",
    "QueueFull",
    "RequestMeta",
    "ResponseMeta",
    "Worker",
    "WorkerPool",
    "decode_request",
    "decode_response",
    "encode_request",
    "encode_response",
    "request_meta",
    "serve",
    "worker_command",
]
