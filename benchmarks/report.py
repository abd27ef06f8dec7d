"""Benchmark output: Markdown tables, a PNG plot, a JSON file with the machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


BATCH = "shmhub send_many/recv_many"
ZERO_COPY = "shmhub reserve/send_reserved (zero-copy)"
MEMCPY = "memcpy (reference: one copy, no transport)"


def _is_baseline(name: str) -> bool:
    return not name.startswith("shmhub") and not name.startswith("memcpy")


def machine_facts() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for mod in ("shmhub", "numpy", "zmq", "faster_fifo", "iceoryx2", "matplotlib"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except ImportError:
            versions[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "loadavg_at_start": os.getloadavg(),
        "versions": versions,
        "shmhub_commit": commit,
    }


def short(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"]
    if "median_us" in r:
        return f"median {r['median_us']:.2f} us, p99 {r['p99_us']:.2f} us ({r['rounds']} rounds)"
    if "msgs_per_s" in r:
        return f"{r['msgs_per_s'] / 1e6:.3f} M msg/s, {r['bytes_per_s'] / 1e9:.3f} GB/s, errors {r['errors']}"
    if "median_ms" in r:
        return f"median {r['median_ms']:.3f} ms"
    if "warm_median_ms" in r:
        return f"memcpy {r['warm_median_ms']:.1f} ms (into fresh pages {r['fresh_pages_median_ms']:.1f} ms)"
    return str(r)


def _ok(rows: dict, key: str) -> dict:
    return {k: v for k, v in rows.items() if key in v}


def _latency_table(title: str, rows: dict) -> list:
    rows = _ok(rows, "median_us")
    out = [f"### {title}", "", "| transport | median µs | p99 µs | rounds |", "|---|---:|---:|---:|"]
    for k, v in sorted(rows.items(), key=lambda kv: kv[1]["median_us"]):
        out.append(f"| {k} | {v['median_us']:.2f} | {v['p99_us']:.2f} | {v['rounds']} |")
    base = {k: v for k, v in rows.items() if _is_baseline(k)}
    if "shmhub" in rows and base:
        best = min(base, key=lambda k: base[k]["median_us"])
        out += [
            "",
            f"shmhub / best baseline ({best}): median {rows['shmhub']['median_us'] / base[best]['median_us']:.3f} "
            f"(shmhub {base[best]['median_us'] / rows['shmhub']['median_us']:.1f}x faster)",
        ]
        pipe = rows.get("multiprocessing.Pipe")
        if pipe:
            out.append(f"multiprocessing.Pipe / shmhub: {pipe['median_us'] / rows['shmhub']['median_us']:.1f}x")
    return out + [""]


def _stream_table(stream: dict) -> list:
    names = []
    for row in stream.values():
        for k in row:
            if k not in names:
                names.append(k)
    sizes = list(stream)
    out = [
        "### One-way streaming (receiver verifies length, sequence number, first and last byte)",
        "",
        "| transport | " + " | ".join(f"{int(s):,} B" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for n in names:
        cells = []
        for s in sizes:
            r = stream[s].get(n)
            if r is None:
                cells.append("")
            elif "error" in r:
                cells.append("error")
            else:
                cells.append(f"{r['msgs_per_s'] / 1e6:.3f} M/s · {r['bytes_per_s'] / 1e9:.2f} GB/s" + (" ⚠" if r["errors"] else ""))
        out.append(f"| {n} | " + " | ".join(cells) + " |")
    out += ["", "| size | shmhub send / best baseline | best shmhub API / best baseline | shmhub send / memcpy | best baseline |", "|---|---:|---:|---:|---|"]
    for s in sizes:
        rows = _ok(stream[s], "bytes_per_s")
        base = {k: v for k, v in rows.items() if _is_baseline(k)}
        if "shmhub" in rows and base:
            best = max(base, key=lambda k: base[k]["bytes_per_s"])
            top = max(v["bytes_per_s"] for k, v in rows.items() if k.startswith("shmhub"))
            b = base[best]["bytes_per_s"]
            mc = rows.get(MEMCPY, {}).get("bytes_per_s")
            out.append(
                f"| {int(s):,} B | {rows['shmhub']['bytes_per_s'] / b:.2f} | {top / b:.2f} | "
                f"{rows['shmhub']['bytes_per_s'] / mc if mc else float('nan'):.2f} | {best} |"
            )
    return out + [""]


def targets(results: dict) -> list:
    """The issue's targets, each with what this run measured."""
    rows = []

    def add(what, got, ok):
        rows.append(f"| {what} | {got} | {'met' if ok else 'NOT met'} |")

    def get(*path):
        r = results
        for k in path:
            if not isinstance(r, dict) or k not in r:
                return None
            r = r[k]
        return r

    pb, pipe = get("pingpong_blocking", "shmhub", "median_us"), get("pingpong_blocking", "multiprocessing.Pipe", "median_us")
    if pb and pipe:
        add("ping-pong blocking <= 3 µs and >= 15x faster than multiprocessing.Pipe", f"{pb:.2f} µs, {pipe / pb:.1f}x", pb <= 3 and pipe / pb >= 15)
    bp, iox = get("pingpong_busy", "shmhub", "median_us"), get("pingpong_busy", "iceoryx2", "median_us")
    if bp and iox:
        add("ping-pong busy-poll <= 1.0 µs and >= 4x faster than iceoryx2", f"{bp:.2f} µs, {iox / bp:.1f}x", bp <= 1.0 and iox / bp >= 4)
    for size, key, want in (("64", "shmhub", 3e6), ("64", BATCH, 10e6), ("4096", "shmhub", 2e6)):
        v = get("stream", size, key, "msgs_per_s")
        if v:
            add(f"streaming {size} B ({key}) >= {want / 1e6:g} M msg/s", f"{v / 1e6:.2f} M msg/s", v >= want)
    for size, want in (("65536", 25e9), ("1048576", 40e9), ("16777216", 28e9)):
        v = get("stream", size, "shmhub", "bytes_per_s")
        mc = get("stream", size, MEMCPY, "bytes_per_s")
        if v:
            add(
                f"streaming {int(size):,} B >= {want / 1e9:g} GB/s",
                f"{v / 1e9:.1f} GB/s (memcpy alone: {mc / 1e9:.1f} GB/s)" if mc else f"{v / 1e9:.1f} GB/s",
                v >= want,
            )
    for size, row in (results.get("stream") or {}).items():
        base = [v["bytes_per_s"] for k, v in row.items() if _is_baseline(k) and "bytes_per_s" in v]
        v = get("stream", size, "shmhub", "bytes_per_s")
        if v and base:
            add(f"streaming {int(size):,} B never slower than the best baseline", f"{v / max(base):.2f}x", v >= max(base))
    shm, cp = get("ndarray", "shmhub (born in shared memory)", "median_ms"), get("ndarray", "shmhub (private array, copied)", "median_ms")
    ref = get("ndarray", "memcpy reference", "warm_median_ms")
    if shm is not None:
        add("256 MiB hand-over, born in shared memory, <= 0.1 ms", f"{shm:.3f} ms", shm <= 0.1)
    if cp is not None and ref:
        add("256 MiB hand-over, copied, <= 1.1x one memcpy", f"{cp:.1f} ms = {cp / ref:.2f}x", cp <= 1.1 * ref)
    if not rows:
        return []
    return ["### Targets (issue 5)", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def _ndarray_table(rows: dict) -> list:
    out = [
        "### 256 MiB numpy array hand-over (until the receiver holds the ndarray, shape, dtype and 64 "
        "sampled bytes checked; every byte is compared afterwards, untimed)",
        "",
        "| method | median ms |",
        "|---|---:|",
    ]
    for k, v in rows.items():
        if "median_ms" in v:
            out.append(f"| {k} | {v['median_ms']:.3f} |")
        elif "warm_median_ms" in v:
            out.append(f"| one memcpy of 256 MiB (destination already faulted) | {v['warm_median_ms']:.3f} |")
            out.append(f"| one memcpy of 256 MiB into fresh pages | {v['fresh_pages_median_ms']:.3f} |")
        else:
            out.append(f"| {k} | {v.get('error', '?')} |")
    ref = rows.get("memcpy reference", {})
    cp = rows.get("shmhub (private array, copied)", {})
    if "median_ms" in cp and "warm_median_ms" in ref:
        out += ["", f"copied hand-over / one memcpy: {cp['median_ms'] / ref['warm_median_ms']:.2f}"]
    return out + [""]


SCALE_TITLES = {
    "fanin": "Fan-in: G guests stream to the host, which receives with host.recv_any",
    "fanout": "Fan-out: the host sends to G guests in turn (round robin)",
    "reqresp": "Request/response: each of G guests ping-pongs with the host (recv_any, echo on that guest's link)",
}
SCALE_BASELINE_NOTE = {
    "multiprocessing.Queue": "multiprocessing.Queue (one bounded queue, G producers)",
    "multiprocessing.Pipe": "multiprocessing.Pipe (one per guest)",
}
SCALE_RATE_GOAL, SHARE_LO, SHARE_HI, SPAWN_GOAL = 0.7, 0.5, 2.0, 2.0


def _rate(r: dict):
    return r.get("rounds_per_s", r.get("msgs_per_s")) if isinstance(r, dict) else None


def _scale_cell(r) -> str:
    if not r:
        return ""
    if "error" in r:
        return "error"
    warn = f" ⚠ {r['errors']} errors" if r.get("errors") else ""
    shares = f"shares {r['share_min']:.2f}–{r['share_max']:.2f}"
    if "rounds_per_s" in r:
        return f"{r['rounds_per_s'] / 1e3:.1f} k rt/s · p50 {r['p50_us']:.0f} µs · p99 {r['p99_us']:.0f} µs · {shares}{warn}"
    return f"{r['msgs_per_s'] / 1e3:.1f} k msg/s · {r['bytes_per_s'] / 1e6:.0f} MB/s · {shares}{warn}"


def _scale_ratio(rows: dict, gs: list):
    """rate at the largest G / rate at 8 guests, or None."""
    if not gs or max(gs) <= 8:
        return None
    hi = str(max(gs))
    a, b = _rate(rows.get(hi)), _rate(rows.get("8"))
    return (a / b) if a is not None and b else None


def _scale_tables(sc: dict) -> list:
    gs = sc.get("guest_counts", [])
    cfg = sc.get("config", {})
    out = [
        "### Many guests, one host (issue 12)",
        "",
        f"Each phase runs {sc.get('seconds')} s: the senders start and stop at shared moments and the rate is what "
        "the receivers verified (header, length and last byte of every message) divided by the time from the start "
        "until every guest's report was in. Payload sizes are drawn per guest and direction from a seeded table: half in the "
        f"inline tier ({cfg.get('inline_sizes', ['?', '?'])[0]}–{cfg.get('inline_sizes', ['?', '?'])[1]} B), "
        f"half in the slot tier ({cfg.get('slot_sizes', ['?', '?'])[0]}–{cfg.get('slot_sizes', ['?', '?'])[1]} B). "
        f"shmhub segment for every G: max_guests {cfg.get('max_guests')}, {cfg.get('bipbuf_capacity', 0) >> 10} KiB rings, "
        f"slot classes {cfg.get('size_classes')}; one host per G runs the three phases in turn on the same guests. "
        f"No process is pinned: {sc.get('cores')} cores shared by all. A share is a guest's count divided by the "
        "mean (fair = 1.00).",
        "",
    ]
    for key in ("fanin", "fanout", "reqresp"):
        if key not in sc:
            continue
        out += [
            f"#### {SCALE_TITLES[key]}",
            "",
            "| transport | " + " | ".join(f"G = {g}" for g in gs) + f" | rate {max(gs)} / 8 |",
            "|---|" + "---:|" * (len(gs) + 1),
        ]
        for name, rows in sc[key].items():
            ratio = _scale_ratio(rows, gs)
            out.append(
                f"| {SCALE_BASELINE_NOTE.get(name, name)} | "
                + " | ".join(_scale_cell(rows.get(str(g))) for g in gs)
                + f" | {'' if ratio is None else f'{ratio:.2f}'} |"
            )
        out.append("")
    host = sc.get("shmhub_host") or {}
    if host:
        out += [
            "shmhub host with the benchmark's guests: "
            + "; ".join(
                f"G = {g}: spawned and connected in {v['spawn_s']:.2f} s, closed in {v['close_s']:.2f} s"
                for g, v in host.items()
                if v and v.get("spawn_s") is not None and v.get("close_s") is not None
            ),
            "",
        ]
    sp = sc.get("spawn")
    if sp:
        out += ["#### Spawning (a minimal guest: import shmhub, connect, send a hello)", ""]
        if "error" in sp:
            out += [f"error: {sp['error']}", ""]
        else:
            out += [
                "| guests | all connected | of which the host's spawn() calls | one cold start (median of "
                + str(len(sp["cold_starts_s"]))
                + ") | G x cold start / cores | ratio (goal <= 2) | host.close() |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {sp['guests']} | {sp['all_connected_s']:.2f} s | {sp['spawn_calls_s']:.2f} s | {1e3 * sp['cold_start_s']:.0f} ms | "
                f"{sp['ideal_s']:.2f} s ({sp['cores']} cores) | {sp['ratio']:.2f} | {sp['close_s']:.2f} s |",
                "",
            ]
    return out


def scale_targets(sc) -> list:
    """Issue 12's goals, each with what this run measured."""
    if not sc:
        return []
    rows = []
    gs = sc.get("guest_counts", [])

    def add(what, got, ok):
        rows.append(f"| {what} | {got} | {'met' if ok else 'NOT met'} |")

    for key in ("fanin", "fanout", "reqresp"):
        rows_ = (sc.get(key) or {}).get("shmhub")
        if not rows_:
            continue
        label = {"fanin": "fan-in", "fanout": "fan-out", "reqresp": "request/response"}[key]
        ratio = _scale_ratio(rows_, gs)
        if ratio is not None:
            a, b = _rate(rows_[str(max(gs))]), _rate(rows_["8"])
            add(
                f"{label}: rate at {max(gs)} guests >= {SCALE_RATE_GOAL} x rate at 8",
                f"{ratio:.2f} ({a / 1e3:.1f} k/s vs {b / 1e3:.1f} k/s)",
                ratio >= SCALE_RATE_GOAL,
            )
        ok = [(g, r) for g, r in rows_.items() if isinstance(r, dict) and "share_min" in r]
        if ok:
            worst_lo = min(ok, key=lambda gr: gr[1]["share_min"])
            worst_hi = max(ok, key=lambda gr: gr[1]["share_max"])
            good = worst_lo[1]["share_min"] >= SHARE_LO and worst_hi[1]["share_max"] <= SHARE_HI
            add(
                f"{label}: every guest's share within {SHARE_LO}x-{SHARE_HI}x of fair, at every G",
                f"lowest {worst_lo[1]['share_min']:.2f} (G = {worst_lo[0]}), highest {worst_hi[1]['share_max']:.2f} (G = {worst_hi[0]})",
                good,
            )
        errs = sum(r.get("errors", 0) for r in rows_.values() if isinstance(r, dict))
        failed = [g for g, r in rows_.items() if not isinstance(r, dict) or "error" in r]
        add(
            f"{label}: every message verified, every G ran",
            f"{errs} errors" + (f", failed at G = {', '.join(failed)}" if failed else ""),
            errs == 0 and not failed,
        )
    sp = sc.get("spawn")
    if sp and "ratio" in sp:
        add(
            f"spawning {sp['guests']} guests <= {SPAWN_GOAL} x ({sp['guests']} x one cold start / cores)",
            f"{sp['all_connected_s']:.2f} s = {sp['ratio']:.2f}x",
            sp["ratio"] <= SPAWN_GOAL,
        )
    elif sp:
        add("spawning 255 guests", sp.get("error", "?"), False)
    if not rows:
        return []
    return ["### Targets (issue 12)", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def _rpc_table(rows: dict) -> list:
    def cell(r: dict, *path: str, fmt: str = "{:.1f}") -> str:
        for k in path:
            if not isinstance(r, dict) or k not in r:
                return "n/a"
            r = r[k]
        return fmt.format(r)

    out = [
        "### RPC: one client, one server process (null call, 32 in flight, 64 MiB numpy echo, idle CPU)",
        "",
        "| system | null call p50 µs | acall p50 µs | calls/s, 32 in flight | 64 MiB echo ms | "
        "64 MiB echo ms (link.empty) | idle CPU %: client / server (client with no call) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        if "error" in r:
            out.append(f"| {name} | {r['error']} | | | | | |")
            continue
        null = cell(r, "null_sync", "median_us")
        if "null_inline_sync" in r:
            null += f" ({cell(r, 'null_inline_sync', 'median_us')} @rpc.inline"
            if "null_async_sync" in r:
                null += f", {cell(r, 'null_async_sync', 'median_us')} async def"
            null += ")"
        calls = cell(r, "pipelined_32", "calls_per_s", fmt="{:,.0f}")
        if "pipelined_32_inline" in r:
            calls += f" ({cell(r, 'pipelined_32_inline', 'calls_per_s', fmt='{:,.0f}')} @rpc.inline)"
        out.append(
            f"| {name} | {null} | {cell(r, 'null_acall', 'median_us')} | {calls} | "
            f"{cell(r, 'echo_64MiB_private', 'median_ms', fmt='{:.2f}')} | "
            f"{cell(r, 'echo_64MiB_link_empty', 'median_ms', fmt='{:.2f}')} | "
            f"{cell(r, 'idle', 'client_cpu_pct')} / {cell(r, 'idle', 'server_cpu_pct')} "
            f"({cell(r, 'idle', 'client_cpu_pct_no_call')}) |"
        )
    return out + [""]


def _rpc_targets(rpc: dict) -> list:
    r = rpc.get("shmhub.rpc") or {}
    rows = []

    def add(what: str, got: "float | None", limit: float, unit: str, le: bool = True) -> None:
        if got is not None:
            ok = got <= limit if le else got >= limit
            rows.append(f"| {what} | {got:,.2f} {unit} | {'met' if ok else 'NOT met'} |")

    def g(*path: str) -> "float | None":
        x: Any = r
        for k in path:
            if not isinstance(x, dict) or k not in x:
                return None
            x = x[k]
        return x

    add("null call p50 (sync) <= 5 µs", g("null_sync", "median_us"), 5, "µs")
    add("acall p50 <= 15 µs", g("null_acall", "median_us"), 15, "µs")
    add(">= 300k calls/s with 32 in flight", g("pipelined_32", "calls_per_s"), 300e3, "calls/s", le=False)
    add("64 MiB echo, private array <= 10 ms", g("echo_64MiB_private", "median_ms"), 10, "ms")
    add("64 MiB echo, link.empty <= 0.5 ms", g("echo_64MiB_link_empty", "median_ms"), 0.5, "ms")
    woke = g("null_after_busy_10ms", "median_ms")
    if woke is not None:  # no copy is left in that echo: an idle server's wake-up sets its time
        rows.append(f"| (for reference: a null call after the same 10 ms fill, same run) | {woke:,.2f} ms | |")
    idle, floor, srv = g("idle", "client_cpu_pct"), g("idle", "client_cpu_pct_no_call"), g("idle", "server_cpu_pct")
    if idle is not None and floor is not None and srv is not None:
        # the client's floor (no call outstanding: the Host's own monitor thread) is not the call's doing
        add("idle with a call outstanding: ~0% CPU (client above its no-call floor, or server; <= 0.5%)", max(idle - floor, srv), 0.5, "%")
    if not rows:
        return []
    return ["### Targets (issue 13)", "", "| target | measured | |", "|---|---|---|", *rows, ""]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# shmhub benchmarks",
        "",
        f"{m['date']} · {m['cpu']} · {m['cpus']} CPUs · Linux {m['kernel']} · Python {m['python']} · "
        f"shmhub {m['shmhub_commit']} · load average at start {m['loadavg_at_start'][0]:.2f}",
        "",
        "Every row was measured in the same invocation, each pair of processes pinned to its own core"
        + (" (the many-guest scenarios pin nothing)." if "scale" in results else "."),
        "",
    ]
    if results.get("baselines_missing"):
        lines += [f"Baselines not installed: {', '.join(results['baselines_missing'])}", ""]
    if "pingpong_blocking" in results:
        lines += _latency_table("Ping-pong, 64 B, blocking receive", results["pingpong_blocking"])
    if "pingpong_busy" in results:
        lines += _latency_table("Ping-pong, 64 B, busy-polling", results["pingpong_busy"])
    if "stream" in results:
        lines += _stream_table(results["stream"])
    if "ndarray" in results:
        lines += _ndarray_table(results["ndarray"])
    if "rpc" in results:
        lines += _rpc_table(results["rpc"])
    if "executor" in results:
        from .executor_bench import table as executor_table

        lines += executor_table(results["executor"])
    if "scale" in results:
        lines += _scale_tables(results["scale"])
    lines += targets(results)
    if "rpc" in results:
        lines += _rpc_targets(results["rpc"])
    lines += scale_targets(results.get("scale"))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    top = any(k in results for k in ("pingpong_blocking", "pingpong_busy", "stream"))
    sc = results.get("scale") or {}
    scen = [k for k in ("fanin", "fanout", "reqresp") if k in sc]
    nrows = int(top) + int(bool(scen))
    if not nrows:
        return False
    fig = plt.figure(figsize=(14, 6 * nrows), constrained_layout=True)
    rows = list(fig.subfigures(nrows, 1)) if nrows > 1 else [fig]  # a row of 2 panels, a row of 3
    if top:
        _plot_two_process(results, *rows.pop(0).subplots(1, 2))
    if scen:
        axes = rows.pop(0).subplots(1, len(scen), squeeze=False)[0]
        for key, ax in zip(scen, axes):
            _plot_scale(sc, key, ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_scale(sc: dict, key: str, ax) -> None:
    for name, rows in sc[key].items():
        pts = [(int(g), _rate(r)) for g, r in rows.items() if _rate(r)]
        if pts:
            pts.sort()
            lo = [r["share_min"] for g, r in sorted(rows.items(), key=lambda gr: int(gr[0])) if _rate(r)]
            hi = [r["share_max"] for g, r in sorted(rows.items(), key=lambda gr: int(gr[0])) if _rate(r)]
            (line,) = ax.plot(*zip(*pts), marker="o", label=name, linewidth=2.5 if name.startswith("shmhub") else 1)
            for (g, v), a, b in zip(pts, lo, hi):
                ax.annotate(f"{a:.2f}–{b:.2f}", (g, v), textcoords="offset points", xytext=(0, 6), fontsize=6, ha="center", color=line.get_color())
    gs = sc.get("guest_counts", [])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if gs:
        ax.set_xticks(gs, [str(g) for g in gs], fontsize=7)
    ax.set_xlabel("guests (labels: lowest–highest share of fair)")
    ax.set_ylabel("round trips/s" if key == "reqresp" else "messages/s")
    ax.set_title({"fanin": "Fan-in to one host", "fanout": "Fan-out from one host", "reqresp": "Request/response with one host"}[key])
    ax.legend(fontsize=7)


def _plot_two_process(results: dict, ax, ax2) -> None:
    groups = [(k, results[k]) for k in ("pingpong_blocking", "pingpong_busy") if k in results]
    x = 0
    ticks, labels = [], []
    for gname, rows in groups:
        for name, r in sorted(_ok(rows, "median_us").items(), key=lambda kv: kv[1]["median_us"]):
            ax.bar(x, r["median_us"], color="tab:orange" if name == "shmhub" else "tab:blue")
            ax.plot([x, x], [r["p10_us"], r["p99_us"]], color="black", linewidth=1)
            ticks.append(x)
            labels.append(f"{name}\n({'blocking' if gname == 'pingpong_blocking' else 'busy'})")
            x += 1
        x += 1
    ax.set_xticks(ticks, labels, rotation=70, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("round trip, µs (bar: median, line: p10–p99)")
    ax.set_title("Ping-pong 64 B")
    ax = ax2
    if "stream" in results:
        sizes = [int(s) for s in results["stream"]]
        names = sorted({n for row in results["stream"].values() for n in row})
        for n in names:
            pts = [(int(s), row[n]["bytes_per_s"] / 1e9) for s, row in results["stream"].items() if n in row and "bytes_per_s" in row[n]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n, linewidth=2.5 if n.startswith("shmhub") else 1, linestyle="--" if n == MEMCPY else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes], fontsize=7)
        ax.set_xlabel("payload bytes")
        ax.set_ylabel("GB/s")
        ax.set_title("One-way streaming throughput")
        ax.legend(fontsize=7)


def write(results: dict, out: Path, stamp: str) -> list:
    md, js, png = out / f"bench-{stamp}.md", out / f"bench-{stamp}.json", out / f"bench-{stamp}.png"
    md.write_text(markdown(results) + "\n")
    js.write_text(json.dumps(results, indent=2, default=str) + "\n")
    paths = [md, js]
    if plot(results, png):
        paths.append(png)
    for p in paths:  # latest.* always points at the newest run
        (out / ("latest" + p.suffix)).write_bytes(p.read_bytes())
    return paths
