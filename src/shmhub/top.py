"""`shmhub top`: a live, read-only view of a running hub. `Tracker` turns samples into rows
(plain data, tested on its own); `run` draws them with rich (the `cli` extra) and reads keys."""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any, Dict, List, Optional

from . import monitor
from .segment import Segment

# Display columns; "fill" and "bells" show both directions (host to guest / guest to host).
COLUMNS = ("peer", "pid", "state", "epoch", "h2g_mps", "h2g_Bps", "g2h_mps", "g2h_Bps", "fill", "slots", "leases", "waits", "bells", "left", "recovered")
SORT_KEYS = ("peer", "pid", "state", "h2g_mps", "h2g_Bps", "g2h_mps", "g2h_Bps", "h2g_fill", "g2h_fill", "slots", "leases", "left")
HOLDERS_EVERY = 2.0  # seconds between scans of /proc for the processes of the hub


def _waits(p: Dict[str, Any]) -> str:
    """Who sleeps on this link now: G/H (guest/host) waiting to r(eceive) or s(end)."""
    flags = [
        ("G:r", p["h2g"]["consumer_waiting"]),
        ("G:s", p["g2h"]["producer_waiting"]),
        ("H:r", p["g2h"]["consumer_waiting"]),
        ("H:s", p["h2g"]["producer_waiting"]),
    ]
    return " ".join(name for name, on in flags if on)


class Tracker:
    """Follows one segment from sample to sample: rates, and departures (Attached -> anything
    else: a goodbye or a death, which the segment does not tell apart) and recoveries (back to
    Empty, the host having reclaimed what the guest held) seen while watching."""

    def __init__(self) -> None:
        self.prev: Optional[monitor.Sample] = None
        self.left: Dict[int, int] = {}
        self.recovered: Dict[int, int] = {}
        self.pids: Dict[int, int] = {}

    def update(self, cur: monitor.Sample, guests: Optional[Dict[int, int]] = None) -> List[Dict[str, Any]]:
        """Rows (one per peer in use or seen in use) for the sample `cur`; `guests` maps peer ids to pids."""
        prev = self.prev or cur
        for peer, pid in (guests or {}).items():
            self.pids[peer] = pid
        for peer, p in cur["peers"].items():
            before = prev["peers"][peer]
            if before["state"] == "Attached" and (p["state"] != "Attached" or p["epoch"] != before["epoch"]):
                self.left[peer] = self.left.get(peer, 0) + 1
            if before["state"] in ("Attached", "Goodbye") and p["state"] in ("Empty", "Reserved") or p["epoch"] > before["epoch"] + 1:
                self.recovered[peer] = self.recovered.get(peer, 0) + 1
        rate = monitor.rates(prev, cur)
        self.prev = cur
        rows = []
        for peer, p in cur["peers"].items():
            if p["state"] == "Empty" and p["epoch"] == 0:
                continue  # never used
            rows.append(
                {
                    "peer": peer,
                    "pid": self.pids.get(peer),
                    "state": p["state"],
                    "epoch": p["epoch"],
                    "h2g_mps": rate[peer]["h2g_mps"],
                    "h2g_Bps": rate[peer]["h2g"],
                    "g2h_mps": rate[peer]["g2h_mps"],
                    "g2h_Bps": rate[peer]["g2h"],
                    "h2g_bells": rate[peer]["h2g_bps"],
                    "g2h_bells": rate[peer]["g2h_bps"],
                    "h2g_fill": p["h2g"]["used"] / p["h2g"]["capacity"],
                    "g2h_fill": p["g2h"]["used"] / p["g2h"]["capacity"],
                    "slots_per_class": list(p["slots_held"]),
                    "slots": sum(p["slots_held"]),
                    "leases": sum(d["leases"] for d in p.get("mmap", {}).values()),
                    "mapped_bytes": sum(d["mapped_bytes"] for d in p.get("mmap", {}).values()),
                    "waits": _waits(p),
                    "left": self.left.get(peer, 0),
                    "recovered": self.recovered.get(peer, 0),
                }
            )
        return rows


def sort_rows(rows: List[Dict[str, Any]], key: str, reverse: bool = False) -> List[Dict[str, Any]]:
    if key not in SORT_KEYS:
        raise ValueError(f"unknown sort key {key!r}; one of {', '.join(SORT_KEYS)}")
    return sorted(rows, key=lambda r: (r[key] is None, r[key] if r[key] is not None else 0), reverse=reverse)


def human_count(per_s: Optional[float]) -> str:
    """Messages per second ("-" for a segment without FEATURE_RING_COUNTERS)."""
    if per_s is None:
        return "-"
    for unit in ("", "k", "M"):
        if per_s < 1000 or unit == "M":
            return f"{per_s:.0f}" if not unit else f"{per_s:.1f}{unit}"
        per_s /= 1000
    raise AssertionError("unreachable")


def human_rate(bps: float) -> str:
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if bps < 1000 or unit == "GB/s":
            return f"{bps:.0f} {unit}" if unit == "B/s" or bps >= 100 else f"{bps:.1f} {unit}"
        bps /= 1000
    raise AssertionError("unreachable")


def render(title: str, cur: monitor.Sample, rows: List[Dict[str, Any]], sort: str, reverse: bool) -> Any:
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, title_justify="left", expand=False)
    for col in COLUMNS:
        name = col.replace("_mps", " msg/s").replace("_Bps", " B/s")
        if col == sort or (col == "fill" and sort.endswith("_fill")):
            name += " v" if reverse else " ^"
        table.add_column(name, justify="left" if col in ("state", "waits", "slots") else "right", no_wrap=True)
    for r in rows:
        style = "red" if r["state"] != "Attached" else None
        table.add_row(
            str(r["peer"]),
            str(r["pid"] or "?"),
            r["state"],
            str(r["epoch"]),
            human_count(r["h2g_mps"]),
            human_rate(r["h2g_Bps"]),
            human_count(r["g2h_mps"]),
            human_rate(r["g2h_Bps"]),
            f"{r['h2g_fill']:.0%}/{r['g2h_fill']:.0%}",
            "/".join(map(str, r["slots_per_class"])),
            str(r["leases"]),
            r["waits"],
            f"{human_count(r['h2g_bells'])}/{human_count(r['g2h_bells'])}",
            str(r["left"]),
            str(r["recovered"]),
            style=style,
        )
    pool = "  ".join(
        f"class {c['class']} ({c['slot_size']} B): {c['allocated']} held, {c['free']} free" + (" [waiters]" if c["waiters"] else "") for c in cur["classes"]
    )
    footer = Text(
        f"pool: {pool}\nhost holds {'/'.join(map(str, cur['host_slots_held']))} slots"
        f"{'   host said goodbye' if cur['host_goodbye'] else ''}\n"
        "keys: q quit  s next sort column  r reverse   waits: G/H guest/host sleeping to r(eceive)/s(end)"
        "   fill, bells: host->guest / guest->host"
    )
    return Group(table, footer)


class _Keys:
    """Single keys from a terminal, without echo; nothing when stdin is not a terminal."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
        self.saved: Any = None

    def __enter__(self) -> "_Keys":
        if self.fd is not None:
            import termios
            import tty

            self.saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None and self.saved is not None:
            import termios

            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)

    def read(self, timeout: float) -> str:
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        return os.read(self.fd, 32).decode(errors="replace") if ready else ""


def run(path: str, *, interval: float = 1.0, sort: str = "peer", reverse: bool = False) -> int:
    """Draw the hub at `path` every `interval` seconds until `q` (or Ctrl-C)."""
    from rich.console import Console
    from rich.live import Live

    tracker = Tracker()
    guests: Dict[int, int] = {}
    scanned = 0.0
    with Segment.attach(path, writable=False) as seg, _Keys() as keys:
        with Live(console=Console(), screen=True, auto_refresh=False) as live:
            while True:
                if time.monotonic() - scanned > HOLDERS_EVERY:
                    guests, scanned = monitor.holders(path)["guests"], time.monotonic()
                cur = monitor.sample(seg)
                rows = sort_rows(tracker.update(cur, guests), sort, reverse)
                live.update(render(f"shmhub top  {path}  {time.strftime('%H:%M:%S')}", cur, rows, sort, reverse), refresh=True)
                for key in keys.read(interval):
                    if key == "q":
                        return 0
                    if key == "s":
                        sort = SORT_KEYS[(SORT_KEYS.index(sort) + 1) % len(SORT_KEYS)]
                    elif key == "r":
                        reverse = not reverse


def snapshot(path: str, interval: float) -> Dict[str, Any]:
    """Two samples `interval` apart, as `top --json` prints them."""
    tracker = Tracker()
    with Segment.attach(path, writable=False) as seg:
        tracker.update(monitor.sample(seg))
        time.sleep(interval)
        cur = monitor.sample(seg)
        rows = tracker.update(cur, monitor.holders(path)["guests"])
    return {
        "path": path,
        "interval": interval,
        "classes": cur["classes"],
        "host_slots_held": cur["host_slots_held"],
        "host_goodbye": cur["host_goodbye"],
        "guests": rows,
    }


def resolve(path: Optional[str], pid: Optional[int]) -> str:
    """The segment path `top` watches: `path`, or the one segment process `pid` holds."""
    if path is not None:
        return path
    assert pid is not None
    found = monitor.segment_fds(pid)
    if not found:
        raise LookupError(f"process {pid} holds no shmhub segment")
    if len(found) > 1:
        raise LookupError(f"process {pid} holds {len(found)} segments; name one: {' '.join(found)}")
    return found[0]
