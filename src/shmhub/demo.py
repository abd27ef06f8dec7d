"""`make demo`: a host spawns guests, runs a ping-pong and a streaming phase with each, prints a table."""

from __future__ import annotations

import statistics
import sys
import time

from . import connect
from .errors import HostGone
from .host import Host
from .layout import SegmentConfig

GUESTS = 2
PINGS = 5000
STREAM = {64: 200_000, 4096: 50_000, 65536: 5_000}  # payload size -> message count
PING, DATA, END = b"P", b"D", b"E"


def guest_main() -> int:
    """The guest: echo pings, count streamed bytes, report the count at the end of a stream."""
    link = connect()
    count = nbytes = 0
    try:
        while True:
            with link.recv() as msg:
                tag = bytes(memoryview(msg)[:1])
                if tag == PING:
                    link.send(msg)
                elif tag == DATA:
                    count += 1
                    nbytes += len(msg)
                elif tag == END:
                    link.send(f"{count} {nbytes}".encode())
                    count = nbytes = 0
    except HostGone:
        return 0
    finally:
        link.close()


def _pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    cfg = SegmentConfig(max_guests=4, bipbuf_capacity=256 * 1024, size_classes=((1024, 256), (16 * 1024, 128), (64 * 1024, 64), (1 << 20, 8)))
    rows = []
    with Host(cfg) as host:
        guests = [host.spawn([sys.executable, "-m", "shmhub.demo", "--guest"]) for _ in range(GUESTS)]
        for g in guests:
            link = g.link
            ping = PING + bytes(63)
            rtts = []
            for _ in range(PINGS):
                t0 = time.perf_counter_ns()
                link.send(ping, timeout=10)
                link.recv(timeout=10).release()
                rtts.append(time.perf_counter_ns() - t0)
            row = {"guest": g.peer_id, "pid": g.pid, "rtt_median_us": statistics.median(rtts) / 1e3, "rtt_p99_us": _pct(rtts, 0.99) / 1e3}
            for size, count in STREAM.items():
                payload = DATA + bytes(size - 1)
                t0 = time.perf_counter()
                for _ in range(count):
                    link.send(payload, timeout=10)
                link.send(END, timeout=10)
                got, nbytes = map(int, link.recv_bytes(timeout=30).split())
                dt = time.perf_counter() - t0
                if (got, nbytes) != (count, count * size):
                    raise SystemExit(f"guest {g.peer_id} counted {got} messages / {nbytes} bytes, expected {count} / {count * size}")
                row[size] = (count / dt, count * size / dt)
            row["stats"] = link.stats
            rows.append(row)
    print(f"{GUESTS} guests, {PINGS} ping-pongs of 64 B each (blocking API), then one-way streams (verified by the guest)\n")
    sizes = list(STREAM)
    head = f"{'guest':>5} {'pid':>7} {'rtt median':>11} {'rtt p99':>9}" + "".join(f" {f'{s} B stream':>22}" for s in sizes)
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['guest']:>5} {r['pid']:>7} {r['rtt_median_us']:>8.1f} us {r['rtt_p99_us']:>6.1f} us"
        for s in sizes:
            rate, bw = r[s]
            line += f" {rate / 1e6:>6.2f} M/s {bw / 1e9:>6.2f} GB/s"
        print(line)
    print("\nhost-side link stats:")
    for r in rows:
        st = r["stats"]
        sent = st.sent_inline + st.sent_slot
        print(
            f"  guest {r['guest']}: sent {st.sent_inline} inline + {st.sent_slot} by slot, received {st.recv_inline + st.recv_slot}; "
            f"ring-full waits {st.ring_full_waits}, slot waits {st.slot_exhaustion_waits}; "
            f"doorbells rung {st.doorbells_rung}, elided {st.doorbells_elided} ({st.doorbells_rung / max(1, sent):.4f} per message)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(guest_main() if "--guest" in sys.argv else main())
