"""Remote links over loopback TCP against raw pyzmq, one run (`python -m benchmarks.remote_bench`).

Both sides pickle the same objects, so the comparison is of transports, not of serialisation:
- round trip: this process sends an object and waits for the echo. shmhub: a RemoteLink (host's
  listener, guest by shmhub.connect) with pickle.dumps/loads on both ends; raw: REQ/REP with
  send_pyobj/recv_pyobj. Also shmhub.rpc's call over the same kind of link, for reference.
- streaming: N objects one way, then an acknowledgement. shmhub: the same link; raw: PUSH/PULL
  (the acknowledgement on a second PUSH/PULL pair).
The shmhub receiver uses recv_bytes below 64 KiB and recv (a zero-copy Message) above, as an
application that knows its sizes would (docs/remote.md); raw pyzmq uses recv_pyobj throughout.
The peer is a child process (`python -m benchmarks.remote_bench peer SYSTEM ENDPOINT...`); this
process runs on core 0, the peer on core 1. Systems alternate within each repeat, and each figure is
the median of the repeats. The goal (issue 18): shmhub's time at most 1.2x raw pyzmq's."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import zmq

from .transports import pin

SMALL = 64
LARGE = 1 << 20
GOAL = 1.2


# -- peers (child processes) -----------------------------------------------------------------


def receiver(link: Any, size: int) -> Callable[[], Any]:
    """What an application that knows its sizes calls: recv_bytes for small payloads, recv (a
    zero-copy Message) for large ones; either way the object is unpickled from it."""
    if size < (64 << 10):
        return lambda: pickle.loads(link.recv_bytes())

    def recv() -> Any:
        with link.recv() as m:
            return pickle.loads(m)

    return recv


def peer_shmhub(endpoint: str) -> None:
    import shmhub

    link = shmhub.connect(endpoint, name="bench")
    recv = receiver(link, 0)
    while True:
        obj = recv()
        if type(obj) is tuple:  # ("size", n), ("stream", n, size), ("rpc",), ("quit",)
            if obj[0] == "quit":
                break
            if obj[0] == "rpc":
                from shmhub import rpc

                rpc.serve(link, {"echo": lambda x: x})
                return
            if obj[0] == "size":
                recv = receiver(link, obj[1])
                continue
            n, each = obj[1], receiver(link, obj[2])
            for _ in range(n):
                each()
            link.send(pickle.dumps(n))
        else:
            link.send(pickle.dumps(obj))
    link.close()


def peer_zmq(rep_url: str, pull_url: str, ack_url: str) -> None:
    ctx = zmq.Context()
    rep, pull, ack = ctx.socket(zmq.REP), ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    rep.connect(rep_url)
    pull.connect(pull_url)
    ack.connect(ack_url)
    poller = zmq.Poller()
    poller.register(rep, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    while True:
        ready = dict(poller.poll())
        if rep in ready:
            obj = rep.recv_pyobj()
            rep.send_pyobj(obj)
            if obj == "quit":
                break
        if pull in ready:
            n = pull.recv_pyobj()[1]
            for _ in range(n):
                pull.recv_pyobj()
            ack.send_pyobj(n)
    for s in (rep, pull, ack):
        s.close(linger=1000)
    ctx.term()


def _peer(argv: List[str]) -> None:
    pin(1)
    if argv[0] == "shmhub":
        peer_shmhub(argv[1])
    else:
        peer_zmq(*argv[1:4])


def _spawn(*args: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, "-m", "benchmarks.remote_bench", "peer", *args])


# -- the two sides of this process -----------------------------------------------------------


class Shmhub:
    name = "shmhub RemoteLink"

    def __init__(self) -> None:
        from shmhub.remote import Listener

        self.listener = Listener("tcp://127.0.0.1:0")
        self.proc = _spawn("shmhub", self.listener.endpoint)
        self.link = self.listener.accept(timeout=30).link

    def round_trip(self, obj: Any, n: int) -> float:
        link, dumps = self.link, pickle.dumps
        link.send(dumps(("size", len(obj))))  # the peer picks its receiver, as an application would
        recv = receiver(link, len(obj))
        t0 = time.perf_counter()
        for _ in range(n):
            link.send(dumps(obj))
            recv()
        return (time.perf_counter() - t0) / n

    def stream(self, obj: Any, n: int) -> float:
        link, dumps = self.link, pickle.dumps
        link.send(dumps(("size", 0)))
        t0 = time.perf_counter()
        link.send(dumps(("stream", n, len(obj))))
        for _ in range(n):
            link.send(dumps(obj))
        assert pickle.loads(link.recv_bytes()) == n
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        self.link.send(pickle.dumps(("quit",)))
        self.proc.wait(30)
        self.listener.close()


class ShmhubRpc:
    """shmhub.rpc calls over a remote link (round trip only)."""

    name = "shmhub.rpc over TCP"

    def __init__(self) -> None:
        from shmhub import rpc
        from shmhub.remote import Listener

        self.listener = Listener("tcp://127.0.0.1:0")
        self.proc = _spawn("shmhub", self.listener.endpoint)
        link = self.listener.accept(timeout=30).link
        link.send(pickle.dumps(("rpc",)))
        self.client = rpc.Client(link)

    def round_trip(self, obj: Any, n: int) -> float:
        call = self.client.call
        t0 = time.perf_counter()
        for _ in range(n):
            call("echo", obj)
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        self.client.close()
        self.proc.wait(30)
        self.listener.close()


class RawZmq:
    name = "pyzmq REQ/REP, PUSH/PULL + pickle"

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.req, self.push, self.ack = self.ctx.socket(zmq.REQ), self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        urls = []
        for s in (self.req, self.push, self.ack):
            s.bind("tcp://127.0.0.1:*")
            urls.append(s.getsockopt_string(zmq.LAST_ENDPOINT))
        self.proc = _spawn("zmq", *urls)

    def round_trip(self, obj: Any, n: int) -> float:
        req = self.req
        t0 = time.perf_counter()
        for _ in range(n):
            req.send_pyobj(obj)
            req.recv_pyobj()
        return (time.perf_counter() - t0) / n

    def stream(self, obj: Any, n: int) -> float:
        push = self.push
        t0 = time.perf_counter()
        push.send_pyobj(("stream", n))
        for _ in range(n):
            push.send_pyobj(obj)
        assert self.ack.recv_pyobj() == n
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        self.req.send_pyobj("quit")
        self.req.recv_pyobj()
        self.proc.wait(30)
        for s in (self.req, self.push, self.ack):
            s.close(0)
        self.ctx.term()


# -- the run ---------------------------------------------------------------------------------


def run(quick: bool) -> Dict[str, Any]:
    pin(0)
    repeats = 3 if quick else 7
    n_rt = {SMALL: 300 if quick else 3000, LARGE: 30 if quick else 300}
    n_stream = {SMALL: 3000 if quick else 50000, LARGE: 50 if quick else 500}
    systems = [Shmhub(), RawZmq(), ShmhubRpc()]
    samples: Dict[Tuple[str, str, int], List[float]] = {}
    try:
        for s in systems:  # warm up: connections, allocators, pickle
            s.round_trip(os.urandom(SMALL), 200)
        for _ in range(repeats):
            for size in (SMALL, LARGE):
                obj = os.urandom(size)
                for s in systems:
                    samples.setdefault((s.name, "round trip", size), []).append(s.round_trip(obj, n_rt[size]))
                    stream: Callable[[Any, int], float] = getattr(s, "stream", None)  # type: ignore[assignment]
                    if stream is not None:
                        samples.setdefault((s.name, "stream", size), []).append(stream(obj, n_stream[size]))
    finally:
        for s in systems:
            s.close()
    out: Dict[str, Any] = {"repeats": repeats, "cpus": os.cpu_count(), "results": {}}
    for (name, kind, size), v in samples.items():
        out["results"].setdefault(name, {})[f"{kind} {size}"] = statistics.median(v)
    return out


def table(res: Dict[str, Any]) -> List[str]:
    r = res["results"]
    shm, raw, rpc_ = r["shmhub RemoteLink"], r["pyzmq REQ/REP, PUSH/PULL + pickle"], r.get("shmhub.rpc over TCP", {})
    lines = [
        f"Loopback TCP, median of {res['repeats']} repeats, {res['cpus']} CPUs (this process on core 0, the peer on core 1)",
        "",
        "| measure | shmhub RemoteLink | raw pyzmq + pickle | ratio (goal <= 1.2) | shmhub.rpc over TCP |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind in ("round trip", "stream"):
        for size in (SMALL, LARGE):
            key = f"{kind} {size}"
            a, b = shm[key], raw[key]
            unit = "µs per round trip" if kind == "round trip" else "µs per message"
            extra = f"{rpc_[key] * 1e6:.1f}" if key in rpc_ else ""
            label = f"{kind}, {size if size < 1024 else size >> 20} {'B' if size < 1024 else 'MiB'} ({unit})"
            ok = "ok" if a / b <= GOAL else "MISSED"
            lines.append(f"| {label} | {a * 1e6:.1f} | {b * 1e6:.1f} | {a / b:.2f} {ok} | {extra} |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        _peer(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test, not for claims)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), help="where remote-DATE.md and .json go")
    args = ap.parse_args()
    res = run(args.quick)
    lines = table(res)
    print("\n".join(lines))
    if not args.quick:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"remote-{stamp}.json"), "w") as fh:
            json.dump(res, fh, indent=2)
        with open(os.path.join(args.out, f"remote-{stamp}.md"), "w") as fh:
            fh.write(f"# Remote links against raw pyzmq, {time.strftime('%Y-%m-%d')} (`python -m benchmarks.remote_bench`, one run)\n\n")
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
