"""CPU a sleeping receiver spends per wake-up: what one message costs when it has to wake its reader
(issue 12: with more processes than cores most messages do, so this bounds the many-guest rates).

A sender sends a 64-byte message every GAP seconds, long enough for the receiver to be asleep in a
blocking receive each time (shmhub's adaptive spin stops spinning after its first misses). The
receiver reads its own CPU time (/proc/self/schedstat, nanoseconds) from its first message to its
last and reports it per message. Same sender pacing and count for every transport, in one run.

    python -m benchmarks.wake_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

GAP = 0.0002
END = b"E"
RESULTS = Path(__file__).parent / "results"


def cpu_ns() -> int:
    with open("/proc/self/schedstat") as f:
        return int(f.read().split()[0])


def receive(recv: Callable[[], Any], ready: Callable[[], Any]) -> float:
    """Say ready (so no message is queued before the receiver runs), receive until END; CPU ns per
    message between the first and the last."""
    ready()
    m = recv()
    t0, n = cpu_ns(), 0
    while True:
        m = recv()
        if len(m) == 1:
            return (cpu_ns() - t0) / max(1, n)
        n += 1
        if hasattr(m, "release"):
            m.release()


def send_paced(send: Callable[[bytes], Any], count: int) -> None:
    msg = b"w" * 64
    for _ in range(count + 1):
        send(msg)
        time.sleep(GAP)
    send(END)


# -- shmhub: the receiver is a guest ------------------------------------------------------------


def shmhub_guest() -> None:
    import shmhub

    link = shmhub.connect()
    try:
        link.send(json.dumps(receive(link.recv, lambda: link.send(b"ready"))).encode())
    finally:
        link.close()


def run_shmhub(count: int) -> float:
    import shmhub

    with shmhub.Host(shmhub.SegmentConfig(max_guests=1)) as host:
        g = host.spawn([sys.executable, "-m", "benchmarks.wake_bench", "--guest"])
        with g.link.recv(30):
            pass  # ready
        send_paced(lambda b: g.link.send(b, 10), count)
        with g.link.recv(30) as m:
            per = float(json.loads(bytes(m)))
        g.wait(30)
    return per


# -- baselines: a forked receiver ---------------------------------------------------------------


def _pipe_child(conn: Any, out: Any) -> None:
    out.send(receive(conn.recv_bytes, lambda: out.send("ready")))


def _socket_child(sock: socket.socket, out: Any) -> None:
    # One 64-byte message per recv (the sender's pacing keeps them apart); END is one byte.
    out.send(receive(lambda: sock.recv(64), lambda: out.send("ready")))


def _run_forked(child: Callable[[Any, Any], None], send: Callable[[bytes], Any], theirs: Any, count: int) -> float:
    ctx = mp.get_context("fork")
    ra, rb = ctx.Pipe()
    p = ctx.Process(target=child, args=(theirs, rb))
    p.start()
    assert ra.recv() == "ready"
    send_paced(send, count)
    per = ra.recv()
    p.join(30)
    return float(per)


def run_pipe(count: int) -> float:
    a, b = mp.get_context("fork").Pipe()
    return _run_forked(_pipe_child, a.send_bytes, b, count)


def run_socketpair(count: int) -> float:
    a, b = socket.socketpair()
    with a, b:
        return _run_forked(_socket_child, a.sendall, b, count)


RUNS: Dict[str, Callable[[int], float]] = {
    "shmhub (link.recv)": run_shmhub,
    "multiprocessing.Pipe (recv_bytes)": run_pipe,
    "socketpair (recv)": run_socketpair,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guest:
        return shmhub_guest()
    count, reps = (500, 1) if args.quick else (5000, 3)
    results: Dict[str, List[float]] = {name: [] for name in RUNS}
    for _ in range(reps):  # interleaved, so drift in the machine's load hits every transport alike
        for name, run in RUNS.items():
            results[name].append(run(count) / 1000)
    med = {name: statistics.median(v) for name, v in results.items()}
    lines = [
        f"# CPU per wake-up of a sleeping receiver ({time.strftime('%Y-%m-%d %H:%M')}, `python -m benchmarks.wake_bench`)",
        "",
        f"64-byte messages {GAP * 1e6:.0f} µs apart, {count} per run, median of {reps} runs; the receiver's own CPU time.",
        "",
        "| receiver | µs of CPU per message | / shmhub |",
        "|---|---:|---:|",
    ]
    for name, v in med.items():
        lines.append(f"| {name} | {v:.1f} | {v / med['shmhub (link.recv)']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"wake-{stamp}.md").write_text(text)
        (RESULTS / f"wake-{stamp}.json").write_text(json.dumps({"count": count, "gap_s": GAP, "runs_us": results}, indent=1))


if __name__ == "__main__":
    main()
