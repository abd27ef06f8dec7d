"""`python -m shmhub`: inspect a segment (and, later, demo and clean)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from . import layout as L
from .errors import ShmhubError
from .peers import STATE_NAMES
from .segment import Segment
from .slots import pool_stats

INSPECT_SCHEMA = 1


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
        state = seg.region.load_u32(lay.peer_entry_offset(pid) + L.PEER_STATE)
        entry = {}
        if seg.features & L.FEATURE_MMAP_LEASES:
            entry["mmap"] = seg.peers.mmap_counters(pid)
        peers.append({
            **entry,
            "peer_id": pid,
            "state": STATE_NAMES.get(state, f"Unknown({state})"),
            "epoch": seg.peers.epoch(pid),
            "last_heartbeat": seg.peers.last_heartbeat(pid),
            "ring_offset": seg.peers.ring_offset(pid),
            **rings,
        })
    classes = pool_stats(seg.pool)
    for c, info in zip(lay.classes, classes):
        tag, head = seg.pool.free_head(info["class"])
        info.update(header_offset=c.header_offset, meta_offset=c.meta_offset, data_offset=c.data_offset, free_head_index=head, free_head_tag=tag,
                    extents=seg.extent_count(info["class"]), max_extents=seg.max_extents(info["class"]),
                    extent_offsets=seg.extent_offsets(info["class"]), waiters=seg.pool.waiting(info["class"]))
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


def _print_text(info: Dict[str, Any], out) -> None:
    h = info["header"]
    print(f"segment {h['magic']!r} v{h['version']}  size {h['total_size']} (current {h['current_size']})  features {h['features']:#x}", file=out)
    print(f"  max_guests {h['max_guests']}  ring capacity {h['bipbuf_capacity']}  max_payload {h['max_payload_size']}  "
          f"inline {h['inline_threshold']} (effective {h['effective_inline_threshold']})  heartbeat {h['heartbeat_interval_ns']} ns  "
          f"goodbye {h['host_goodbye']}", file=out)
    print("peers:", file=out)
    for p in info["peers"]:
        rings = "  ".join(f"{n} w={p[n]['write']} wm={p[n]['watermark']} r={p[n]['read']} used={p[n]['used']}/{p[n]['capacity']}" for n in ("g2h", "h2g"))
        print(f"  {p['peer_id']:3d} {p['state']:<9} epoch {p['epoch']:<5} hb {p['last_heartbeat']:<12} {rings}", file=out)
        if "mmap" in p and any(v for d in p["mmap"].values() for v in d.values()):
            print("      mmap " + "  ".join(f"{n}: {d['mappings']} mappings, {d['mapped_bytes']} bytes, {d['leases']} leases" for n, d in p["mmap"].items()), file=out)
    print("slot classes:", file=out)
    for c in info["slot_classes"]:
        print(f"  {c['class']:3d} slot_size {c['slot_size']:>9}  count {c['slot_count']:>6}  free {c['free']:>6}  allocated {c['allocated']:>6}"
              f"  extents {c['extents']}/{c['max_extents']}", file=out)


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
    p.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto",
                   help="uvicorn's HTTP parser (h11 accepts any method token, httptools is faster)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="warning and above: no access log")

    def run(args: argparse.Namespace) -> int:
        from .http import serve

        try:
            serve(args.app, workers=args.workers, bind=args.bind, timeout=args.timeout, max_in_flight=args.max_in_flight,
                  queue=args.queue, interface=args.interface, http=args.http,
                  log_level=args.log_level)
        except (ValueError, OSError, ShmhubError) as e:
            print(f"shmhub serve: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        return 0
    p.set_defaults(run=run)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shmhub")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("inspect", help="decode a segment file")
    ins.add_argument("path")
    ins.add_argument("--json", action="store_true", help="machine-readable output (docs/inspect.md)")
    sub.add_parser("demo", help="two processes exchanging messages through one segment")
    add_serve_parser(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "run"):
        return int(args.run(args))
    if args.cmd == "demo":
        from .demo import main as demo

        return demo()
    if args.cmd == "inspect":
        try:
            with Segment.attach(args.path, writable=False) as seg:
                info = inspect_segment(seg)
        except (ShmhubError, OSError) as e:
            print(f"shmhub inspect: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if args.json:
            json.dump(info, sys.stdout, indent=2, sort_keys=True)
            print()
        else:
            _print_text(info, sys.stdout)
    return 0
