"""Benchmark output: Markdown tables, a PNG plot, a JSON file with the machine facts."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


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
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cpus": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0)), "kernel": platform.release(), "python": sys.version.split()[0],
            "loadavg_at_start": os.getloadavg(), "versions": versions, "shmhub_commit": commit}


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
    base = {k: v for k, v in rows.items() if not k.startswith("shmhub")}
    if "shmhub" in rows and base:
        best = min(base, key=lambda k: base[k]["median_us"])
        out += ["", f"shmhub / best baseline ({best}): median {rows['shmhub']['median_us'] / base[best]['median_us']:.3f} "
                    f"(shmhub {base[best]['median_us'] / rows['shmhub']['median_us']:.1f}x faster)"]
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
    out = ["### One-way streaming (receiver verifies length, sequence number, first and last byte)", "",
           "| transport | " + " | ".join(f"{int(s):,} B" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
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
    out += ["", "| size | shmhub / best baseline (throughput) |", "|---|---:|"]
    for s in sizes:
        rows = _ok(stream[s], "bytes_per_s")
        base = {k: v for k, v in rows.items() if not k.startswith("shmhub")}
        if "shmhub" in rows and base:
            best = max(base, key=lambda k: base[k]["bytes_per_s"])
            top = max(v["bytes_per_s"] for k, v in rows.items() if k.startswith("shmhub"))
            out.append(f"| {int(s):,} B | {top / base[best]['bytes_per_s']:.2f} (best baseline: {best}) |")
    return out + [""]


def _ndarray_table(rows: dict) -> list:
    out = ["### 256 MiB numpy array hand-over (until the receiver holds a verified ndarray)", "",
           "| method | median ms |", "|---|---:|"]
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


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = ["# shmhub benchmarks", "",
             f"{m['date']} · {m['cpu']} · {m['cpus']} CPUs · Linux {m['kernel']} · Python {m['python']} · "
             f"shmhub {m['shmhub_commit']} · load average at start {m['loadavg_at_start'][0]:.2f}", "",
             "Every row was measured in the same invocation, each pair of processes pinned to its own core.", ""]
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
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    ax = axes[0]
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
    ax = axes[1]
    if "stream" in results:
        sizes = [int(s) for s in results["stream"]]
        names = sorted({n for row in results["stream"].values() for n in row})
        for n in names:
            pts = [(int(s), row[n]["bytes_per_s"] / 1e9) for s, row in results["stream"].items() if n in row and "bytes_per_s" in row[n]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=n, linewidth=2.5 if n.startswith("shmhub") else 1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes], fontsize=7)
        ax.set_xlabel("payload bytes")
        ax.set_ylabel("GB/s")
        ax.set_title("One-way streaming throughput")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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
