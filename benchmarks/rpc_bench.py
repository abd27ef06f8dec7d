"""RPC scenario of `python -m benchmarks --only rpc`: shmhub.rpc against multiprocessing managers,
pyzmq REQ/REP (DEALER for pipelining) + pickle and grpcio over a Unix socket, one client (this
process, core 0) and one server process (core 1).

Measured per system: null call round trip (p50, sync; shmhub also acall, an @rpc.inline and an
async def handler), calls/s with 32 in flight, the echo of a 64 MiB numpy array (argument and result; for
shmhub also with the argument allocated by link.empty), and the CPU both processes use while a
call is outstanding but nothing is ready.

Server side: `python -m benchmarks.rpc_bench serve SYSTEM [ADDRESS]`."""

from __future__ import annotations

import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, Optional

from .transports import pin

ECHO_BYTES = 64 << 20
WINDOW = 32
IDLE_SECONDS = 1.0


# -- handlers (every server serves the same three) -------------------------------------------------


def null() -> None:
    return None


def echo(x: Any) -> Any:
    return x


def idle(seconds: float) -> float:
    """Sleep, then report this process's CPU seconds so far (the idle measurement's server side)."""
    time.sleep(seconds)
    return time.process_time()


async def anull() -> None:
    return None


def cpu() -> float:
    return time.process_time()


HANDLERS = {"null": null, "echo": echo, "idle": idle, "cpu": cpu}


# -- servers ---------------------------------------------------------------------------------------


def serve(system: str, address: Optional[str]) -> None:
    pin(1)
    if system == "shmhub":
        import shmhub
        from shmhub import rpc

        link = shmhub.connect()
        try:
            rpc.serve(link, {**HANDLERS, "null_inline": rpc.inline(null), "null_async": anull})
        finally:
            link.close()
    elif system == "zmq":
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(address)
        while True:
            frames = sock.recv_multipart(copy=False)
            ident, delim, body, *bufs = frames
            method, args = pickle.loads(body.buffer, buffers=[f.buffer for f in bufs])
            if method == "stop":
                sock.send_multipart([ident, delim, pickle.dumps(None)])
                break
            oob: list = []
            out = pickle.dumps(HANDLERS[method](*args), 5, buffer_callback=oob.append)
            sock.send_multipart([ident, delim, out, *[b.raw() for b in oob]], copy=False)
        sock.close(0)
        ctx.term()
    elif system == "grpc":
        import grpc
        from concurrent import futures

        def handle(body: bytes, context: Any) -> bytes:
            method, args = pickle.loads(body)
            return pickle.dumps(HANDLERS[method](*args), 5)

        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WINDOW), options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        )
        ident = lambda b: b  # noqa: E731  (raw bytes through)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench", {"call": grpc.unary_unary_rpc_method_handler(handle, ident, ident)}),))
        server.add_insecure_port(address)
        server.start()
        sys.stdin.read()  # until the client closes our stdin
        server.stop(0)


# -- measurements ----------------------------------------------------------------------------------


def _p50_us(call: Callable[[], Any], seconds: float, max_rounds: int = 200_000) -> Dict[str, float]:
    for _ in range(200):
        call()
    ts = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end and len(ts) < max_rounds:
        t = time.perf_counter_ns()
        call()
        ts.append(time.perf_counter_ns() - t)
    ts.sort()
    return {"median_us": statistics.median(ts) / 1e3, "p99_us": ts[int(len(ts) * 0.99)] / 1e3, "rounds": len(ts)}


def _echo_ms(echo_fn: Callable[[Any], Any], make: Callable[[], Any], reps: int) -> Dict[str, float]:
    ts = []
    for i in range(reps + 1):
        a = make()
        a[0], a[-1] = i, -i
        t = time.perf_counter_ns()
        r = echo_fn(a)
        el = time.perf_counter_ns() - t
        assert r.shape == (ECHO_BYTES // 8,) and r[0] == i and r[-1] == -i
        assert (r[1 : -1 : 1 << 12] == 1.0).all()  # sampled; the argument is not read again (it was handed over)
        del r, a
        if i:
            ts.append(el)
    return {"median_ms": statistics.median(ts) / 1e6}


def _client_cpu_pct(seconds: float) -> float:
    """This process's CPU while it sleeps with no call outstanding (threads of the transport, e.g.
    the shmhub Host's monitor): the floor under the idle measurement."""
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    return 100 * ((ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)) / wall


def _idle_cpu(call_idle: Callable[[float], float], server_cpu: Callable[[], float]) -> Dict[str, float]:
    """CPU of both processes over IDLE_SECONDS with one call outstanding and nothing to do."""
    floor = _client_cpu_pct(IDLE_SECONDS)
    before_srv = server_cpu()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    after_srv = call_idle(IDLE_SECONDS)
    wall = time.perf_counter() - t
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    me = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    return {"client_cpu_pct": 100 * me / wall, "server_cpu_pct": 100 * (after_srv - before_srv) / wall, "client_cpu_pct_no_call": floor}


def bench_shmhub(secs: float, reps: int) -> Dict[str, Any]:
    import asyncio

    import numpy as np

    import shmhub
    from shmhub import rpc

    out: Dict[str, Any] = {}
    with shmhub.Host(shmhub.SegmentConfig(max_guests=2, bipbuf_capacity=1 << 20)) as host:
        g = host.spawn([sys.executable, "-m", "benchmarks.rpc_bench", "serve", "shmhub"])
        c = rpc.Client(g.link)
        c.call("null", timeout=30)
        out["null_sync"] = _p50_us(lambda: c.call("null"), secs)
        out["null_inline_sync"] = _p50_us(lambda: c.call("null_inline"), secs)
        out["null_async_sync"] = _p50_us(lambda: c.call("null_async"), secs)

        async def acalls() -> Dict[str, float]:
            for _ in range(200):
                await c.acall("null_inline")
            ts = []
            end = time.perf_counter() + secs
            while time.perf_counter() < end and len(ts) < 100_000:
                t = time.perf_counter_ns()
                await c.acall("null_inline")
                ts.append(time.perf_counter_ns() - t)
            return {"median_us": statistics.median(ts) / 1e3, "rounds": len(ts)}

        out["null_acall"] = asyncio.run(acalls())

        def pipelined(method: str) -> Dict[str, float]:
            from collections import deque

            n = 0
            q: deque = deque(c.submit(method) for _ in range(WINDOW))
            t = time.perf_counter()
            end = t + secs
            while time.perf_counter() < end:
                q.popleft().result()
                q.append(c.submit(method))
                n += 1
            el = time.perf_counter() - t
            while q:
                q.popleft().result()
            return {"calls_per_s": n / el}

        out["pipelined_32"] = pipelined("null")
        out["pipelined_32_inline"] = pipelined("null_inline")
        out["echo_64MiB_private"] = _echo_ms(lambda a: c.call("echo", a, timeout=30), lambda: np.ones(ECHO_BYTES // 8), reps)
        out["echo_64MiB_link_empty"] = _echo_ms(lambda a: c.call("echo", a, timeout=30), lambda: _filled(g.link.empty(ECHO_BYTES // 8)), reps)
        out["null_after_busy_10ms"] = _after_busy_ms(lambda: c.call("null", timeout=30), 4 * reps)
        out["idle"] = _idle_cpu(lambda s: c.call("idle", s, timeout=30), lambda: c.call("cpu", timeout=30))
        host.close()
        g.wait(30)
        c.close()
    return out


def _after_busy_ms(call: Callable[[], Any], reps: int) -> Dict[str, float]:
    """A call made after the caller was busy 10 ms (as the echo's 64 MiB fill keeps it) while the
    server idled: the floor under the echo, set by how fast an idle server process wakes up."""
    ts = []
    for _ in range(reps):
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass
        t = time.perf_counter_ns()
        call()
        ts.append(time.perf_counter_ns() - t)
    return {"median_ms": statistics.median(ts) / 1e6}


def _filled(a: Any) -> Any:
    a[:] = 1.0
    return a


def bench_manager(secs: float, reps: int) -> Dict[str, Any]:
    import multiprocessing as mp
    import threading
    from multiprocessing.managers import BaseManager

    import numpy as np

    class Svc:
        def null(self) -> None:
            return None

        def echo(self, x: Any) -> Any:
            return x

        def idle(self, s: float) -> float:
            return idle(s)

        def cpu(self) -> float:
            return time.process_time()

    class M(BaseManager):
        pass

    M.register("Svc", Svc)
    m = M(ctx=mp.get_context("fork"))
    m.start()
    try:
        os.sched_setaffinity(m._process.pid, {1 % (os.cpu_count() or 1)})  # type: ignore[attr-defined]
        p = m.Svc()  # type: ignore[attr-defined]
        out: Dict[str, Any] = {"null_sync": _p50_us(p.null, secs)}
        # 32 in flight: 32 threads, each with its own proxy (a proxy's connection is per thread)
        count = [0]
        stop = time.perf_counter() + secs
        lock = threading.Lock()

        def worker() -> None:
            q = m.Svc()  # type: ignore[attr-defined]
            n = 0
            while time.perf_counter() < stop:
                q.null()
                n += 1
            with lock:
                count[0] += n

        th = [threading.Thread(target=worker) for _ in range(WINDOW)]
        t = time.perf_counter()
        for x in th:
            x.start()
        for x in th:
            x.join()
        out["pipelined_32"] = {"calls_per_s": count[0] / (time.perf_counter() - t)}
        out["echo_64MiB_private"] = _echo_ms(p.echo, lambda: np.ones(ECHO_BYTES // 8), reps)
        out["idle"] = _idle_cpu(p.idle, p.cpu)
        return out
    finally:
        m.shutdown()


def bench_zmq(secs: float, reps: int) -> Dict[str, Any]:
    import zmq
    import numpy as np

    addr = f"ipc://{tempfile.gettempdir()}/shmhub-rpcbench-{uuid.uuid4().hex}"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.rpc_bench", "serve", "zmq", addr])
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.connect(addr)
    try:

        def call(method: str, *args: Any) -> Any:
            oob: list = []
            body = pickle.dumps((method, args), 5, buffer_callback=oob.append)
            req.send_multipart([body, *[b.raw() for b in oob]], copy=False)
            body, *bufs = req.recv_multipart(copy=False)
            return pickle.loads(body.buffer, buffers=[f.buffer for f in bufs])

        call("null")
        out: Dict[str, Any] = {"null_sync": _p50_us(lambda: call("null"), secs)}
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(addr)
        msg = [b"", pickle.dumps(("null", ()), 5)]
        for _ in range(WINDOW):
            dealer.send_multipart(msg)
        n = 0
        t = time.perf_counter()
        end = t + secs
        while time.perf_counter() < end:
            dealer.recv_multipart()
            dealer.send_multipart(msg)
            n += 1
        el = time.perf_counter() - t
        for _ in range(WINDOW):
            dealer.recv_multipart()
        dealer.close(0)
        out["pipelined_32"] = {"calls_per_s": n / el}
        out["echo_64MiB_private"] = _echo_ms(lambda a: call("echo", a), lambda: np.ones(ECHO_BYTES // 8), reps)
        out["idle"] = _idle_cpu(lambda s: call("idle", s), lambda: call("cpu"))
        call("stop")
        return out
    finally:
        req.close(0)
        ctx.term()
        proc.wait(30)
        try:
            os.unlink(addr[len("ipc://") :])
        except FileNotFoundError:
            pass


def bench_grpc(secs: float, reps: int) -> Dict[str, Any]:
    import grpc
    import numpy as np

    path = f"{tempfile.gettempdir()}/shmhub-rpcbench-{uuid.uuid4().hex}.sock"
    addr = f"unix:{path}"
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.rpc_bench", "serve", "grpc", addr], stdin=subprocess.PIPE)
    ch = grpc.insecure_channel(addr, options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
    try:
        grpc.channel_ready_future(ch).result(timeout=30)
        stub = ch.unary_unary("/bench/call", request_serializer=None, response_deserializer=None)

        def call(method: str, *args: Any) -> Any:
            return pickle.loads(stub(pickle.dumps((method, args), 5)))

        call("null")
        out: Dict[str, Any] = {"null_sync": _p50_us(lambda: call("null"), secs)}
        body = pickle.dumps(("null", ()), 5)
        from collections import deque

        q: deque = deque(stub.future(body) for _ in range(WINDOW))
        n = 0
        t = time.perf_counter()
        end = t + secs
        while time.perf_counter() < end:
            q.popleft().result()
            q.append(stub.future(body))
            n += 1
        el = time.perf_counter() - t
        while q:
            q.popleft().result()
        out["pipelined_32"] = {"calls_per_s": n / el}
        out["echo_64MiB_private"] = _echo_ms(lambda a: call("echo", a), lambda: np.ones(ECHO_BYTES // 8), reps)
        out["idle"] = _idle_cpu(lambda s: call("idle", s), lambda: call("cpu"))
        return out
    finally:
        ch.close()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(30)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


SYSTEMS = {
    "shmhub.rpc": (bench_shmhub, None),
    "multiprocessing BaseManager": (bench_manager, None),
    "pyzmq REQ/REP + pickle 5": (bench_zmq, "zmq"),
    "grpcio (Unix socket) + pickle": (bench_grpc, "grpc"),
}


def run(quick: bool) -> Dict[str, Any]:
    """Every available system, measured in this one invocation."""
    secs, reps = (0.3, 2) if quick else (2.0, 5)
    results: Dict[str, Any] = {}
    for name, (fn, module) in SYSTEMS.items():
        if module is not None:
            try:
                __import__(module)
            except ImportError:
                results[name] = {"error": f"{module} is not installed"}
                continue
        print(f"rpc: {name}", flush=True)
        try:
            results[name] = fn(secs, reps)
        except Exception as e:  # a baseline that fails is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"  {results[name]}", flush=True)
    return results


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
