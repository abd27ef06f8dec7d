"""`python -m benchmarks.http_bench [--quick]`: `shmhub serve` against `uvicorn --workers 2` and
`granian --workers 2` (when installed), same Starlette app (tests/http/apps/star.py), 2 workers
each, driven by a bounded Python load generator (asyncio, raw HTTP/1.1 keep-alive connections) on
the same machine. Part of `make bench`; docs/http.md has the results.

Scenarios: trivial JSON GET (req/s); CPU-bound GET, 5 ms of Python (req/s); mixed load, 90%
trivial + 10% 50 ms of CPU (p99 of the trivial ones), the CPU in Starlette's thread pool (a sync
endpoint) or on the event loop (an async endpoint that blocks); a 1 MiB response (req/s); and the dispatch
itself: the gateway called in-process (front -> worker -> front, no HTTP) against the app called
in-process, p50 of each."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP_DIR = os.path.join(ROOT, "tests", "http")
APP = "apps.star:app"

SCENARIOS: Dict[str, List[Tuple[str, float]]] = {
    "trivial": [("/", 1.0)],
    "cpu5": [("/cpu?n={5}", 1.0)],
    "mixed": [("/", 0.9), ("/cpu?n={50}", 0.1)],
    "mixed_blocking": [("/", 0.9), ("/cpu_block?n={50}", 0.1)],
    "blob1m": [("/blob/1048576", 1.0)],
}


def turns_per_ms() -> float:
    """Turns of the app's work() loop per ms of one core, measured here before any server runs:
    the CPU endpoints get a fixed amount of work (a wall-clock spin would overlap in a thread pool
    and flatter a server that runs many at once)."""
    sys.path.insert(0, APP_DIR)
    try:
        from apps.star import work
    finally:
        sys.path.remove(APP_DIR)
    n = 200_000
    best = min(_timed(work, n) for _ in range(9))
    return n / (best * 1e3)


def _timed(fn: Callable[[int], Any], n: int) -> float:
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


def _scenarios(per_ms: float) -> Dict[str, List[Tuple[str, float]]]:
    """SCENARIOS with {ms} made into that many ms of work() turns."""
    return {k: [(p.replace("{5}", str(int(5 * per_ms))).replace("{50}", str(int(50 * per_ms))), w) for p, w in mix] for k, mix in SCENARIOS.items()}


def _collector(sent: List[Any]) -> Any:
    async def send(m: Any) -> None:
        sent.append(m)

    return send


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _servers() -> Dict[str, Callable[[int], List[str]]]:
    out: Dict[str, Callable[[int], List[str]]] = {
        "shmhub": lambda p: [sys.executable, "-m", "shmhub", "serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{p}", "--log-level", "warning"],
        "shmhub --switch-interval 0.0005": lambda p: [
            *[sys.executable, "-m", "shmhub", "serve", APP, "--workers", "2", "--bind", f"127.0.0.1:{p}", "--log-level", "warning"],
            *["--switch-interval", "0.0005"],
        ],
        "uvicorn": lambda p: [sys.executable, "-m", "uvicorn", APP, "--workers", "2", "--port", str(p), "--no-access-log", "--log-level", "warning"],
    }
    granian = shutil.which("granian") or os.path.join(os.path.dirname(sys.executable), "granian")
    if os.path.exists(granian):
        out["granian"] = lambda p: [granian, "--interface", "asgi", "--workers", "2", "--port", str(p), "--log-level", "warning", "--no-ws", APP]
    return out


class Server:
    """One server process group, ready once GET / answers 200."""

    def __init__(self, argv: Sequence[str], port: int, timeout: float = 60.0) -> None:
        self.port = port
        self.proc = subprocess.Popen(list(argv), cwd=APP_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not asyncio.run(_probe(port)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[:4]} did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


async def _probe(port: int) -> bool:
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        status, _ = await asyncio.wait_for(_request(r, w, "/"), 5.0)
        return status == 200
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    finally:
        w.close()


async def _request(r: asyncio.StreamReader, w: asyncio.StreamWriter, path: str) -> Tuple[int, int]:
    w.write(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
    head = await r.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    if length:
        await r.readexactly(length)
    return status, length


async def _load(port: int, mix: List[Tuple[str, float]], conns: int, seconds: float, seed: int = 1) -> Dict[str, Any]:
    """conns keep-alive connections, each sending its next request when the last is answered
    (a closed loop: the load is bounded), for `seconds`; latencies per path."""
    paths = [p for p, _ in mix]
    weights = [w for _, w in mix]
    lat: Dict[str, List[float]] = {p: [] for p in paths}
    errors = 0
    stop = time.monotonic() + seconds

    async def conn(i: int) -> None:
        nonlocal errors
        rnd = random.Random(seed * 1000 + i)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < stop:
                path = rnd.choices(paths, weights)[0]
                t0 = time.perf_counter()
                status, _ = await asyncio.wait_for(_request(r, w, path), 30.0)
                if status != 200:
                    errors += 1
                lat[path].append(time.perf_counter() - t0)
        finally:
            w.close()

    t0 = time.monotonic()
    await asyncio.gather(*(conn(i) for i in range(conns)))
    elapsed = time.monotonic() - t0
    n = sum(len(v) for v in lat.values())
    return {
        "rps": n / elapsed,
        "errors": errors,
        "p50_ms": {p: _pct(v, 50) * 1e3 for p, v in lat.items()},
        "p99_ms": {p: _pct(v, 99) * 1e3 for p, v in lat.items()},
    }


def _pct(xs: List[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p / 100))]


async def _dispatch_overhead(n: int) -> Dict[str, float]:
    """p50 of one trivial GET: the app awaited in-process, and the gateway awaited in-process with
    one worker (front -> worker -> front over shared memory, no HTTP parsing on either path)."""
    sys.path.insert(0, APP_DIR)
    from apps.star import app  # type: ignore[import-not-found]

    from shmhub.http import Gateway, WorkerPool, encode_request, request_meta, worker_command

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"bench")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def timed(a: Any) -> List[float]:
        out = []
        for _ in range(n):
            sent: List[Any] = []
            send = _collector(sent)
            t0 = time.perf_counter()
            await a(dict(scope), receive, send)
            out.append(time.perf_counter() - t0)
            assert sent[0]["status"] == 200
        return out

    direct = await timed(app)
    pool = WorkerPool(worker_command(APP, "asgi", 32), 1)
    await pool.start()
    try:
        via = await timed(Gateway(pool, timeout=10.0))
        # The worker's part: its "http" call awaited directly (no gateway, no HTTP metadata work here).
        client, meta = pool.workers[0].client, encode_request(request_meta(scope))
        call = []
        for rid in range(n):
            t0 = time.perf_counter()
            await client.acall("http", rid, meta, b"", False, 0, timeout=10.0)
            call.append(time.perf_counter() - t0)
    finally:
        await pool.close()
    d, g, w = (statistics.median(x) * 1e6 for x in (direct, via, call))
    return {"app_p50_us": d, "gateway_p50_us": g, "overhead_p50_us": g - d, "worker_call_p50_us": w}


def run(quick: bool, only: Optional[List[str]] = None) -> Dict[str, Any]:
    seconds, conns = (2.0, 16) if quick else (6.0, 32)
    try:
        import uvloop  # the load generator's own overhead, as small as Python allows

        uvloop.install()
    except ImportError:
        pass
    per_ms = turns_per_ms()
    scenarios = _scenarios(per_ms)
    results: Dict[str, Any] = {"quick": quick, "seconds": seconds, "connections": conns, "load": os.getloadavg(), "work_turns_per_ms": per_ms, "servers": {}}
    for name, argv in _servers().items():
        if only and name not in only:
            continue
        port = _free_port()
        server = Server(argv(port), port)
        try:
            asyncio.run(_load(port, SCENARIOS["trivial"], conns, 0.5))  # warm-up
            results["servers"][name] = {sc: asyncio.run(_load(port, mix, conns, seconds)) for sc, mix in scenarios.items()}
        finally:
            server.stop()
        print(f"{name}: {json.dumps(results['servers'][name])}", file=sys.stderr)
    cwd = os.getcwd()
    os.chdir(APP_DIR)  # the worker imports the app from its cwd
    try:
        results["dispatch"] = asyncio.run(_dispatch_overhead(300 if quick else 2000))
    finally:
        os.chdir(cwd)
    return results


def table(res: Dict[str, Any]) -> str:
    rows = [
        "| server | trivial GET req/s | CPU 5 ms req/s | mixed: trivial p99 ms | mixed, blocking: trivial p99 ms | 1 MiB req/s | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["servers"].items():
        errors = sum(s["errors"] for s in r.values())
        rows.append(
            f"| {name} | {r['trivial']['rps']:,.0f} | {r['cpu5']['rps']:,.0f} | {r['mixed']['p99_ms']['/']:.1f} "
            f"| {r['mixed_blocking']['p99_ms']['/']:.1f} | {r['blob1m']['rps']:,.0f} | {errors} |"
        )
    d = res["dispatch"]
    rows.append("")
    rows.append(
        f"dispatch (in-process, trivial GET, p50): app {d['app_p50_us']:.1f} µs, through the gateway and one "
        f"worker {d['gateway_p50_us']:.1f} µs: overhead {d['overhead_p50_us']:.1f} µs"
        + (f" (the worker's call alone {d['worker_call_p50_us']:.1f} µs)" if "worker_call_p50_us" in d else "")
    )
    rows.append(
        f"load average at start {res['load'][0]:.2f}; {res['connections']} connections, {res['seconds']} s per scenario; "
        f"CPU work: {res['work_turns_per_ms']:,.0f} loop turns per ms"
    )
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_bench")
    p.add_argument("--quick", action="store_true", help="2 s per scenario, 16 connections")
    p.add_argument("--only", nargs="*", help="servers to run (shmhub, 'shmhub --switch-interval 0.0005', uvicorn, granian)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    res = run(args.quick, args.only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print(table(res))


if __name__ == "__main__":
    main()
