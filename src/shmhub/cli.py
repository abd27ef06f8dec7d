"""`shmhub` / `python -m shmhub`: inspect, top, clean, bench, demo (exit status 0 ok, 1 failure, 2 usage)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

from . import layout as L
from .errors import ShmhubError
from .peers import STATE_NAMES
from .segment import Segment
from .slots import pool_stats
from .top import SORT_KEYS

INSPECT_SCHEMA = 1
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_SHM_DIR = "/dev/shm"


def inspect_segment(seg: Segment) -> Dict[str, Any]:
    """Everything `inspect --json` prints (schema documented in docs/inspect.md)."""
    cfg, lay = seg.config, seg.layout
    waiters = seg.features & L.FEATURE_POOL_WAITERS
    peers = []
    for pid in range(1, cfg.max_guests + 1):
        rings = {}
        for name, ring in (("g2h", seg.g2h(pid)), ("h2g", seg.h2g(pid))):
            write, watermark, read = ring.indices
            if watermark:
                used = (watermark - read) + write
            else:
                used = max(0, write - read)
            rings[name] = {"offset": ring.offset, "capacity": ring.capacity, "write": write, "watermark": watermark, "read": read, "used": used}
            sent, bells = ring.sent, ring.doorbells
            if sent is not None and bells is not None:  # FEATURE_RING_COUNTERS
                rings[name].update(sent_messages=sent[0], sent_bytes=sent[1], doorbells=bells)
        state = seg.region.load_u32(lay.peer_entry_offset(pid) + L.PEER_STATE)
        entry = {}
        if seg.features & L.FEATURE_MMAP_LEASES:
            entry["mmap"] = seg.peers.mmap_counters(pid)
        peers.append(
            {
                **entry,
                "peer_id": pid,
                "state": STATE_NAMES.get(state, f"Unknown({state})"),
                "epoch": seg.peers.epoch(pid),
                "last_heartbeat": seg.peers.last_heartbeat(pid),
                "ring_offset": seg.peers.ring_offset(pid),
                **rings,
            }
        )
    classes = pool_stats(seg.pool)
    for c, info in zip(lay.classes, classes):
        tag, head = seg.pool.free_head(info["class"])
        info.update(
            header_offset=c.header_offset,
            meta_offset=c.meta_offset,
            data_offset=c.data_offset,
            free_head_index=head,
            free_head_tag=tag,
            extents=seg.extent_count(info["class"]),
            max_extents=seg.max_extents(info["class"]),
            extent_offsets=seg.extent_offsets(info["class"]),
            waiters=seg.pool.waiting(info["class"]),
        )
    return {
        "schema": INSPECT_SCHEMA,
        "header": {
            "magic": seg.magic.decode("latin-1"),
            "version": L.VERSION,
            "header_size": L.HEADER_SIZE,
            "total_size": lay.total_size,
            "current_size": seg.current_size,
            "max_payload_size": cfg.max_payload_size,
            "inline_threshold": cfg.inline_threshold,
            "effective_inline_threshold": seg.inline_threshold,
            "max_guests": cfg.max_guests,
            "bipbuf_capacity": cfg.bipbuf_capacity,
            "peer_table_offset": lay.peer_table_offset,
            "var_pool_offset": lay.var_pool_offset,
            "heartbeat_interval_ns": cfg.heartbeat_interval_ns,
            "host_goodbye": int(seg.host_goodbye),
            "num_var_slot_classes": len(cfg.size_classes),
            "features": seg.features,
            "attention": seg.region.load_u32(L.HDR_ATTENTION) if waiters else 0,
            "share_links": seg.region.load_u32(L.HDR_SHARE_LINKS) if waiters else 0,
            "file_size": seg.file_size,
        },
        "peers": peers,
        "slot_classes": classes,
    }


def _print_text(info: Dict[str, Any], out: TextIO) -> None:
    h = info["header"]
    print(f"segment {h['magic']!r} v{h['version']}  size {h['total_size']} (current {h['current_size']})  features {h['features']:#x}", file=out)
    print(
        f"  max_guests {h['max_guests']}  ring capacity {h['bipbuf_capacity']}  max_payload {h['max_payload_size']}  "
        f"inline {h['inline_threshold']} (effective {h['effective_inline_threshold']})  heartbeat {h['heartbeat_interval_ns']} ns  "
        f"goodbye {h['host_goodbye']}",
        file=out,
    )
    print("peers:", file=out)
    for p in info["peers"]:
        rings = "  ".join(f"{n} w={p[n]['write']} wm={p[n]['watermark']} r={p[n]['read']} used={p[n]['used']}/{p[n]['capacity']}" for n in ("g2h", "h2g"))
        print(f"  {p['peer_id']:3d} {p['state']:<9} epoch {p['epoch']:<5} hb {p['last_heartbeat']:<12} {rings}", file=out)
        if "mmap" in p and any(v for d in p["mmap"].values() for v in d.values()):
            maps = (f"{n}: {d['mappings']} mappings, {d['mapped_bytes']} bytes, {d['leases']} leases" for n, d in p["mmap"].items())
            print("      mmap " + "  ".join(maps), file=out)
    print("slot classes:", file=out)
    for c in info["slot_classes"]:
        print(
            f"  {c['class']:3d} slot_size {c['slot_size']:>9}  count {c['slot_count']:>6}  free {c['free']:>6}  allocated {c['allocated']:>6}"
            f"  extents {c['extents']}/{c['max_extents']}",
            file=out,
        )


def _fail(cmd: str, e: BaseException) -> int:
    print(f"shmhub {cmd}: {type(e).__name__}: {e}", file=sys.stderr)
    return EXIT_FAILURE


def _inspect(args: argparse.Namespace) -> int:
    try:
        seg = Segment.attach(args.path, writable=False)
    except (ShmhubError, OSError) as e:
        return _fail("inspect", e)
    with seg:
        try:
            while True:
                info = inspect_segment(seg)
                if args.watch and not args.json:
                    sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: refresh in place
                if args.json:  # with --watch: one object per line, for scripts
                    json.dump(info, sys.stdout, indent=None if args.watch else 2, sort_keys=True)
                    print()
                else:
                    _print_text(info, sys.stdout)
                sys.stdout.flush()
                if not args.watch:
                    return EXIT_OK
                time.sleep(args.interval)
        except (ShmhubError, OSError) as e:
            return _fail("inspect", e)
        except KeyboardInterrupt:  # how --watch ends
            return EXIT_OK


def _top(args: argparse.Namespace) -> int:
    from . import top

    try:
        path = top.resolve(args.path, args.pid)
        if args.json:
            json.dump(top.snapshot(path, args.interval), sys.stdout, indent=2, sort_keys=True)
            print()
            return EXIT_OK
        return top.run(path, interval=args.interval, sort=args.sort, reverse=args.reverse)
    except ImportError as e:
        print(f"shmhub top: {e}; install the extra: pip install 'shmhub[cli]'", file=sys.stderr)
        return EXIT_FAILURE
    except (ShmhubError, OSError, LookupError) as e:
        return _fail("top", e)
    except KeyboardInterrupt:
        return EXIT_OK


def _clean(args: argparse.Namespace) -> int:
    from . import monitor

    try:
        stale = monitor.stale_segments(args.paths or [DEFAULT_SHM_DIR])
    except OSError as e:
        return _fail("clean", e)
    if args.json and not args.yes:
        json.dump([vars(s) for s in stale], sys.stdout, indent=2)
        print()
        return EXIT_OK
    if not args.json:
        for s in stale:
            used = f"  (still open in pids {' '.join(map(str, s.holders))})" if s.holders else ""
            print(f"stale: {s.path}  {s.size} bytes{used}")
        if not stale:
            print("no stale segments")
            return EXIT_OK
    if not args.yes:
        try:
            answer = input(f"remove {len(stale)} stale segment(s)? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed", file=sys.stderr)
            return EXIT_FAILURE
    removed, failed = [], 0
    for s in stale:
        try:
            if monitor.remove_if_stale(s.path):  # a host may have taken the name again meanwhile
                removed.append(s.path)
        except OSError as e:
            failed += 1
            print(f"shmhub clean: cannot remove {s.path}: {e.strerror}", file=sys.stderr)
    if args.json:
        json.dump({"removed": removed}, sys.stdout, indent=2)
        print()
    else:
        print(f"removed {len(removed)}")
    return EXIT_FAILURE if failed else EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    """The benchmarks of the source tree (benchmarks/, not installed), results in a temporary directory."""
    import importlib
    import tempfile
    from pathlib import Path

    tree = Path(__file__).resolve().parents[2]
    if (tree / "benchmarks" / "__main__.py").exists() and str(tree) not in sys.path:
        sys.path.insert(0, str(tree))
    try:
        bench = importlib.import_module("benchmarks.__main__")
    except ImportError as e:
        print(f"shmhub bench: the benchmarks ship with the source tree (benchmarks/), not found: {e}", file=sys.stderr)
        return EXIT_FAILURE
    argv = (["--quick"] if args.quick else []) + (["--only", *args.only] if args.only else []) + (["--guests", *map(str, args.guests)] if args.guests else [])
    if args.out:
        return int(bench.main(argv + ["--out", args.out]) or 0)
    with tempfile.TemporaryDirectory(prefix="shmhub-bench-") as out:
        return int(bench.main(argv + ["--out", out]) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shmhub", description="Inspect, watch and clean up shmhub segments; exit status 0 ok, 1 failure, 2 usage error.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="decode a segment file (docs/inspect.md)")
    ins.add_argument("path", help="a named segment, or /proc/PID/fd/N of an anonymous one")
    ins.add_argument("--json", action="store_true", help="machine-readable output (docs/inspect.md)")
    ins.add_argument("--watch", action="store_true", help="refresh in place until Ctrl-C")
    ins.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (--watch)")
    top = sub.add_parser("top", help="a live view of a running hub (needs the cli extra: rich)")
    where = top.add_mutually_exclusive_group(required=True)
    where.add_argument("path", nargs="?", help="a named segment, or /proc/PID/fd/N")
    where.add_argument("--pid", type=int, help="the hub's host (or any guest) process: its anonymous segment")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--sort", choices=SORT_KEYS, default="peer", help="initial sort column (key s cycles)")
    top.add_argument("--reverse", action="store_true", help="sort descending (key r toggles)")
    top.add_argument("--json", action="store_true", help="print one snapshot (two samples --interval apart) and exit")
    cl = sub.add_parser("clean", help="remove stale named segments (their host is gone)")
    cl.add_argument("paths", nargs="*", help=f"segment files or directories to search (default {DEFAULT_SHM_DIR})")
    cl.add_argument("--yes", action="store_true", help="remove without asking")
    cl.add_argument("--json", action="store_true", help="list (or, with --yes, remove and list) as JSON")
    be = sub.add_parser("bench", help="the benchmark scenarios of benchmarks/, printing the table")
    be.add_argument("--quick", action="store_true", help="short phases (a smoke run, not for claims)")
    be.add_argument("--only", nargs="+", help="scenarios: pingpong busypoll stream ndarray rpc fanin fanout reqresp spawn")
    be.add_argument("--guests", nargs="+", type=int, help="guest counts of the many-guest scenarios")
    be.add_argument("--out", help="keep the table, plot and JSON here (default: a temporary directory, removed)")
    sub.add_parser("demo", help="two processes exchanging messages through one segment")
    add_serve_parser(sub)
    add_worker_parser(sub)
    return parser


def add_worker_parser(sub: Any) -> None:
    """`shmhub worker tcp://HOST:PORT`: a remote worker of an Executor(listen=...) (docs/remote.md)."""
    p = sub.add_parser("worker", help="join an executor over TCP as a remote worker (needs the remote extra: pyzmq)")
    p.add_argument("url", help="tcp://HOST:PORT, the executor's address")
    p.add_argument("--keys", help="this worker's CURVE secret key file")
    p.add_argument("--server-key", help="the executor's CURVE public key file")
    p.add_argument("--liveness", type=float, default=1.5, help="seconds without heartbeats before the executor counts as gone")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the executor")
    p.add_argument("--name", default="worker", help="how the executor names this worker")

    def run(args: argparse.Namespace) -> int:
        from .executor._worker import serve_remote

        try:
            serve_remote(args.url, keys=args.keys, server_key=args.server_key, liveness=args.liveness, timeout=args.timeout, name=args.name)
        except (ValueError, OSError, ShmhubError) as e:
            print(f"shmhub worker: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return 0

    p.set_defaults(run=run)


def add_serve_parser(sub: Any) -> None:
    """`shmhub serve MODULE:APP`: HTTP over the hub (docs/http.md); runs through args.run."""
    p = sub.add_parser("serve", help="serve an ASGI or WSGI app: uvicorn front, worker guests (docs/http.md)")
    p.add_argument("app", help="MODULE:APP, e.g. myapp.main:app")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--bind", default="127.0.0.1:8000", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request, then 504")
    p.add_argument("--max-in-flight", type=int, default=32, help="requests in flight per worker")
    p.add_argument("--queue", type=int, default=1024, help="requests queued in the front, then 503")
    p.add_argument("--interface", choices=("auto", "asgi", "wsgi"), default="auto")
    p.add_argument(
        "--http", choices=("auto", "h11", "httptools"), default="auto", help="uvicorn's HTTP parser (h11 accepts any method token, httptools is faster)"
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"), help="warning and above: no access log")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="the workers' GIL switch interval, seconds (Python's: 0.005; shorter: quick requests wait less behind CPU-bound sync ones)",
    )

    def run(args: argparse.Namespace) -> int:
        from .http import serve

        try:
            serve(
                args.app,
                workers=args.workers,
                bind=args.bind,
                timeout=args.timeout,
                max_in_flight=args.max_in_flight,
                queue=args.queue,
                interface=args.interface,
                http=args.http,
                log_level=args.log_level,
                switch_interval=args.switch_interval,
            )
        except (ValueError, OSError, ShmhubError) as e:
            print(f"shmhub serve: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0

    p.set_defaults(run=run)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if hasattr(args, "run"):  # serve, worker
        return int(args.run(args))
    if args.cmd == "demo":
        from .demo import main as demo

        return demo()
    if args.cmd in ("top", "inspect") and args.interval <= 0:
        print(f"shmhub {args.cmd}: --interval must be positive", file=sys.stderr)
        return EXIT_USAGE
    commands: Dict[str, Callable[[argparse.Namespace], int]] = {"inspect": _inspect, "top": _top, "clean": _clean, "bench": _bench}
    return commands[args.cmd](args)
