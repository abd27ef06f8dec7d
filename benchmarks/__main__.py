"""`python -m benchmarks [--quick] [--only SCENARIO ...] [--guests G ...]`: runs every scenario with
shmhub and each installed baseline in this one invocation, each pair pinned to two cores, and writes
a Markdown table, a PNG plot and a JSON file (with machine facts) under benchmarks/results/.

Scenarios: pingpong, busypoll, stream, ndarray (two processes) and fanin, fanout, reqresp, spawn
(one host and G guests, benchmarks/scale.py; G from --guests, 2 8 64 255 by default)."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

from . import report, scale
from .scenarios import SIDES, handshake_a, handshake_b, memcpy_rate, memcpy_reference
from .transports import Shmhub, available, pin

SIZES = [64, 4096, 65536, 1 << 20, 16 << 20]
RESULTS = Path(__file__).parent / "results"


def _child(transport, scenario, params):
    pin(1)
    transport.open("b")
    try:
        handshake_b(transport)
        SIDES[scenario][1](transport, params)
    finally:
        transport.close()


def run_baseline(cls, scenario, params):
    t = cls()
    proc = mp.get_context("fork").Process(target=_child, args=(t, scenario, params), daemon=True)
    proc.start()
    try:
        t.open("a")
        handshake_a(t)
        return SIDES[scenario][0](t, params)
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
        t.close()


def run_shmhub(scenario, params):
    import shmhub

    # One class per streamed size, as a user would configure them; a slot holds its payload plus the
    # u32 length prefix. A few 64 KiB slots keep the ones in flight in the L2 cache.
    cfg = shmhub.SegmentConfig(
        max_guests=2,
        bipbuf_capacity=1 << 20,
        max_payload_size=(1 << 30) - 1,
        size_classes=((1024, 2048), (16 << 10, 256), ((64 << 10) + 4096, 8), ((1 << 20) + 4096, 16)),
    )
    with shmhub.Host(cfg, spin_ns=params.get("spin_ns", shmhub.link.DEFAULT_SPIN_NS)) as host:
        g = host.spawn([sys.executable, "-m", "benchmarks.child", scenario, json.dumps(params)])
        t = Shmhub(g.link, params.get("size", 0))
        handshake_a(t)
        out = SIDES[scenario][0](t, params)
        g.wait(60)
        out["link_stats"] = g.link.stats.as_dict()
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="short phases (a smoke run, not for claims)")
    ap.add_argument(
        "--only",
        nargs="*",
        default=["pingpong", "busypoll", "stream", "ndarray", "rpc", "executor", *scale.SCENARIOS, "spawn"],
        help="scenarios to run: pingpong busypoll stream ndarray rpc executor fanin fanout reqresp spawn (default: all)",
    )
    ap.add_argument("--guests", nargs="*", type=int, default=list(scale.GUEST_COUNTS), help="guest counts of the many-guest scenarios (spawn uses the largest)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    secs = 0.3 if args.quick else 2.0
    pin(0)
    baselines = available()
    results = {
        "machine": report.machine_facts(),
        "baselines_missing": sorted(set(["pipe", "queue", "socketpair", "zmq", "faster-fifo", "iceoryx2"]) - set(baselines)),
    }

    def both(name, scenario, params, skip=()):
        row = {"shmhub": run_shmhub(scenario, params)}
        print(f"  {name}: shmhub {report.short(row['shmhub'])}", flush=True)
        for key, cls in baselines.items():
            if key in skip:
                continue
            try:
                row[cls.name] = run_baseline(cls, scenario, params)
                print(f"  {name}: {cls.name} {report.short(row[cls.name])}", flush=True)
            except Exception as e:  # a baseline that fails is reported, not fatal
                row[cls.name] = {"error": f"{type(e).__name__}: {e}"}
        return row

    if "pingpong" in args.only:
        print("ping-pong 64 B, blocking receive", flush=True)
        results["pingpong_blocking"] = both("blocking", "pingpong", {"size": 64, "busy": False, "seconds": secs, "warmup": 0.2, "max_rounds": 200000})
    if "busypoll" in args.only:
        print("ping-pong 64 B, busy-polling", flush=True)
        results["pingpong_busy"] = both("busy", "pingpong", {"size": 64, "busy": True, "seconds": secs, "warmup": 0.2, "max_rounds": 500000}, skip=("queue",))
    if "stream" in args.only:
        results["stream"] = {}
        for size in SIZES:
            print(f"streaming {size} B", flush=True)
            row = both(f"{size} B", "stream", {"size": size, "seconds": secs})
            extra = {}
            if size == 64:
                extra[report.BATCH] = run_shmhub("stream", {"size": size, "seconds": secs, "batch": 1024})
            if size >= 4096:
                extra[report.ZERO_COPY] = run_shmhub("stream", {"size": size, "seconds": secs, "zero_copy": True})
            extra[report.MEMCPY] = memcpy_rate(size, min(secs, 0.5))
            for k, v in extra.items():
                print(f"  {size} B: {k} {report.short(v)}", flush=True)
            row.update(extra)
            results["stream"][str(size)] = row
    if "ndarray" in args.only:
        n = 256 << 20
        reps = 3 if args.quick else 7
        print("256 MiB ndarray hand-over", flush=True)
        row = {
            "shmhub (born in shared memory)": run_shmhub("ndarray", {"nbytes": n, "mode": "shm", "reps": reps}),
            "shmhub (private array, copied)": run_shmhub("ndarray", {"nbytes": n, "mode": "copy_shmhub", "reps": reps}),
        }
        for key in ("pipe", "zmq", "socketpair"):
            if key in baselines:
                try:
                    row[baselines[key].name] = run_baseline(baselines[key], "ndarray", {"nbytes": n, "mode": "bytes", "reps": reps})
                except Exception as e:
                    row[baselines[key].name] = {"error": f"{type(e).__name__}: {e}"}
        row["memcpy reference"] = memcpy_reference(n, reps)
        for k, v in row.items():
            print(f"  {k}: {report.short(v)}", flush=True)
        results["ndarray"] = row
    if "rpc" in args.only:
        from . import rpc_bench

        print("rpc: request/response", flush=True)
        results["rpc"] = rpc_bench.run(args.quick)
    if "executor" in args.only:
        from . import executor_bench

        print("executor: process pools, 2 workers", flush=True)
        results["executor"] = executor_bench.run(args.quick)
    many = [s for s in (*scale.SCENARIOS, "spawn") if s in args.only]
    if many:
        if not args.guests or not all(1 <= g <= 255 for g in args.guests):
            ap.error("--guests takes counts between 1 and 255")
        print(f"many guests, one host: {' '.join(many)} at G = {' '.join(map(str, args.guests))}", flush=True)
        results["scale"] = scale.run(set(many), sorted(set(args.guests)), 0.5 if args.quick else 2.0, log=lambda line: print(line, flush=True))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = report.write(results, out, stamp)
    print("\n" + (out / f"bench-{stamp}.md").read_text())
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
