"""The Flask (WSGI) example app of the HTTP tests."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Iterator

from flask import Flask, Response, jsonify, request

app = Flask(__name__)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"]


@app.route("/items/<int:item_id>/tags/<tag>", methods=METHODS)
@app.route("/echo", methods=METHODS)
def echo(item_id: int = 0, tag: str = "") -> Response:
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = request.stream.read(65536)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    return jsonify(
        method=request.method,
        path=request.path,
        query=request.query_string.decode(),
        query_items=list(request.args.items(multi=True)),
        params={"item_id": item_id, "tag": tag},
        headers=[[k.lower(), v] for k, v in request.headers.items()],
        body_len=n,
        body_sha256=h.hexdigest(),
        pid=os.getpid(),
    )


@app.route("/blob/<int:n>")
def blob(n: int) -> Response:
    return Response((bytes(range(256)) * (n // 256 + 1))[:n], mimetype="application/octet-stream")


@app.route("/count")
def count() -> Response:
    n = int(request.args.get("n", "5"))

    def gen() -> Iterator[bytes]:
        for i in range(n):
            yield f"{i}\n".encode()

    return Response(gen(), mimetype="text/plain")


@app.route("/sleep")
def sleep() -> str:
    s = float(request.args.get("s", "1"))
    time.sleep(s)
    return str(os.getpid())


@app.route("/pid")
def pid() -> str:
    return str(os.getpid())


@app.route("/boom")
def boom() -> str:
    raise RuntimeError("boom")
