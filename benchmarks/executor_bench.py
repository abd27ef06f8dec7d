"""Executor scenario of `python -m benchmarks --only executor` (also `python -m benchmarks.executor_bench
[--quick]`): shmhub.Executor against ProcessPoolExecutor (spawn) and loky, 2 workers each (mpire's map
failed here on plain functions: not measured),
one pool at a time, in this one invocation.

Measured per pool: trivial task round trip (`submit(...).result()`, p50), trivial tasks/s submitted
one by one, items/s through map (the same chunk size for every pool: len / (8 workers)), a task
taking a 64 MiB float64 array and returning its sum (from private memory; shmhub also from
executor.empty), a task returning a 64 MiB array. shmhub alone: futures failed after a SIGKILL of
a worker, the lateness of a deadline, and trivial tasks/s with max_tasks_per_child=25."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

WORKERS = 2
ARRAY_N = 8 << 20  # 64 MiB of float64


def trivial(x: int = 0) -> int:
    return x


def total(a: Any) -> float:
    return float(a.sum())


def make(n: int) -> Any:
    return np.ones(n)


def pid() -> int:
    return os.getpid()


def sleep(t: float) -> float:
    time.sleep(t)
    return t


# -- pools -----------------------------------------------------------------------------------------


class Pool:
    """A common face: submit -> Future, map(fn, items, chunksize) -> list, close."""

    name = "pool"

    def submit(self, fn: Callable[..., Any], *args: Any) -> "cf.Future[Any]":
        return self.ex.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: List[Any], chunksize: int) -> List[Any]:
        return list(self.ex.map(fn, items, chunksize=chunksize))

    def close(self) -> None:
        self.ex.shutdown(wait=True)


class Shmhub(Pool):
    name = "shmhub.Executor"

    def __init__(self, **kw: Any) -> None:
        import shmhub

        self.ex = shmhub.Executor(WORKERS, preload=("numpy",), **kw)


class ProcessPool(Pool):
    name = "ProcessPoolExecutor (spawn)"

    def __init__(self, **kw: Any) -> None:
        self.ex = cf.ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn"), **kw)


class Loky(Pool):
    name = "loky"

    def __init__(self) -> None:
        from loky import get_reusable_executor

        self.ex = get_reusable_executor(WORKERS, reuse=False)


# -- measurements ----------------------------------------------------------------------------------


def _round_trip(p: Pool, seconds: float) -> Dict[str, float]:
    for _ in range(50):
        p.submit(trivial, 1).result()
    times: List[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and len(times) < 100_000:
        t0 = time.perf_counter()
        p.submit(trivial, 1).result()
        times.append(time.perf_counter() - t0)
    return {"p50_us": statistics.median(times) * 1e6, "n": len(times)}


def _submit_rate(p: Pool, n: int) -> float:
    t0 = time.perf_counter()
    fs = [p.submit(trivial, i) for i in range(n)]
    cf.wait(fs)
    return n / (time.perf_counter() - t0)


def _map_rate(p: Pool, n: int) -> float:
    items = list(range(n))
    t0 = time.perf_counter()
    out = p.map(trivial, items, max(1, n // (8 * WORKERS)))
    dt = time.perf_counter() - t0
    assert len(out) == n and out[-1] == n - 1
    return n / dt


def _ms(call: Callable[[], Any], reps: int) -> float:
    call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_pool(make_pool: Callable[[], Pool], quick: bool) -> Dict[str, Any]:
    secs, n, reps = (0.5, 5_000, 3) if quick else (2.0, 20_000, 7)
    t0 = time.perf_counter()
    p = make_pool()
    out: Dict[str, Any] = {"start_s": time.perf_counter() - t0}
    try:
        out["round_trip"] = _round_trip(p, secs)
        out["submit_per_s"] = _submit_rate(p, n)
        out["map_items_per_s"] = _map_rate(p, n * 20)
        a = np.ones(ARRAY_N)
        out["array_arg_ms"] = _ms(lambda: p.submit(total, a).result(), reps)
        out["array_result_ms"] = _ms(lambda: p.submit(make, ARRAY_N).result(), reps)
        if isinstance(p, Shmhub):
            s = p.ex.empty(ARRAY_N)
            s[:] = 1.0
            out["array_arg_shared_ms"] = _ms(lambda: p.submit(total, s).result(), reps)
    finally:
        p.close()
    return out


def bench_failures(quick: bool) -> Dict[str, Any]:
    """shmhub only: a killed worker's future failed after the kill; a deadline's lateness;
    max_tasks_per_child=25 against none."""
    import shmhub

    out: Dict[str, Any] = {}
    trials = 5 if quick else 20
    with shmhub.Executor(WORKERS, preload=("numpy",)) as ex:
        kill_ms, late_ms = [], []
        for _ in range(trials):
            f = ex.submit(sleep, 30.0)
            while not any(w["in_flight"] for w in ex.stats()["workers"]):
                time.sleep(0.001)
            time.sleep(0.02)
            victim = next(w["pid"] for w in ex.stats()["workers"] if w["in_flight"])
            t0 = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            try:
                f.result(10)
            except shmhub.WorkerCrashed:
                pass
            kill_ms.append((time.perf_counter() - t0) * 1e3)
            ex.submit(trivial).result(10)  # replaced
            t0 = time.perf_counter()
            g = ex.options(timeout=0.05).submit(sleep, 30.0)
            try:
                g.result(10)
            except TimeoutError:
                pass
            late_ms.append((time.perf_counter() - t0 - 0.05) * 1e3)
        out["kill_to_failed_ms"] = statistics.median(kill_ms)
        out["deadline_late_ms"] = statistics.median(late_ms)
    n = 2_000 if quick else 10_000
    rates = {}
    for label, kw in (("none", {}), ("25", {"max_tasks_per_child": 25})):
        with shmhub.Executor(WORKERS, preload=("numpy",), **kw) as ex:
            ex.submit(trivial).result(30)
            t0 = time.perf_counter()
            cf.wait([ex.submit(trivial, i) for i in range(n)])
            rates[label] = n / (time.perf_counter() - t0)
    out["recycle_25_ratio"] = rates["25"] / rates["none"]
    return out


POOLS: Dict[str, Callable[[], Pool]] = {"shmhub.Executor": Shmhub, "ProcessPoolExecutor (spawn)": ProcessPool, "loky": Loky}


def run(quick: bool) -> Dict[str, Any]:
    import multiprocessing.forkserver  # noqa: F401  (mp.forkserver below)

    from .scale import unpinned

    # `python -m benchmarks` pins its process to core 0 for the two-process scenarios: the pools'
    # workers (and a forkserver started meanwhile) would inherit that one core. Every pool here
    # gets both cores, as when this module runs alone.
    with unpinned():
        mp.forkserver._forkserver._stop()  # type: ignore[attr-defined]  # one started pinned
        return _run(quick)


def _run(quick: bool) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    for name, make_pool in POOLS.items():
        print(f"  {name}", flush=True)
        try:
            results[name] = bench_pool(make_pool, quick)
        except ImportError as e:
            results[name] = {"error": f"not installed ({e.name})"}
        except Exception as e:  # a baseline that breaks is reported, not fatal
            results[name] = {"error": f"{type(e).__name__}: {e}"[:120]}
    a = np.ones(ARRAY_N)
    reps = 3 if quick else 7
    results["in-process reference (no pool)"] = {"array_arg_ms": _ms(lambda: total(a), reps), "array_result_ms": _ms(lambda: make(ARRAY_N), reps)}
    results["shmhub failures"] = bench_failures(quick)
    return results


def table(results: Dict[str, Any]) -> List[str]:
    def f(r: Dict[str, Any], key: str, fmt: str, sub: Optional[str] = None) -> str:
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        return "n/a" if v is None or v != v else fmt.format(v)

    lines = [
        "### Executor: 2 workers (trivial tasks, 64 MiB arrays)",
        "",
        "| pool | start s | round trip p50 µs | submit tasks/s | map items/s | 64 MiB arg ms | 64 MiB arg ms (executor.empty) | 64 MiB result ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        if name == "shmhub failures":
            continue
        if "error" in r:
            lines.append(f"| {name} | {r['error']} | | | | | | |")
            continue
        if "start_s" not in r:  # the reference: the task's own work, in this process
            lines.append(f"| {name} | | | | | {f(r, 'array_arg_ms', '{:.1f}')} | | {f(r, 'array_result_ms', '{:.1f}')} |")
            continue
        lines.append(
            f"| {name} | {f(r, 'start_s', '{:.2f}')} | {f(r, 'round_trip', '{:.0f}', 'p50_us')} | "
            f"{f(r, 'submit_per_s', '{:,.0f}')} | {f(r, 'map_items_per_s', '{:,.0f}')} | "
            f"{f(r, 'array_arg_ms', '{:.1f}')} | {f(r, 'array_arg_shared_ms', '{:.2f}')} | "
            f"{f(r, 'array_result_ms', '{:.1f}')} |"
        )
    fl = results.get("shmhub failures", {})
    lines += [
        "",
        f"shmhub only: a SIGKILLed worker's future failed {f(fl, 'kill_to_failed_ms', '{:.1f}')} ms "
        f"after the kill (p50); a 50 ms deadline enforced {f(fl, 'deadline_late_ms', '{:.1f}')} ms late (p50); "
        f"max_tasks_per_child=25 keeps {f(fl, 'recycle_25_ratio', '{:.0%}')} of the trivial-task rate.",
        "",
    ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    results = run(args.quick)
    print("\n".join(table(results)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
