"""Soak (issue 17): mixed traffic -- inline, slot and mmap-tier echoes, RPC calls -- between a host
and several guests, with random SIGKILLs of guests and respawns, for SHMHUB_SOAK_SECONDS (default
3600). Every few seconds the host's RSS, open fds and free slots per class are sampled into a
report (printed, and written to SHMHUB_SOAK_REPORT if set); after a warm-up they must stay flat.

    SHMHUB_SOAK_SECONDS=60 .venv/bin/python -m pytest -m slow -s tests/stress/test_soak.py
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import threading
import time

import pytest

from shmhub import Host, SegmentConfig
from shmhub import rpc
from shmhub.errors import HostGone, PeerDead, RpcError, ShmTimeout

GUESTS = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "guests"))
CFG = SegmentConfig(max_guests=8, bipbuf_capacity=64 * 1024, size_classes=((1024, 64), (16 * 1024, 32), (64 * 1024, 16, 4)))
SAMPLE_EVERY = 2.0
KILL_EVERY = 1.5  # on average; a seeded exponential gap
CALL_TIMEOUT = 10.0
ECHOES, RPCS = 3, 2
# Flat: the second half of the samples after warm-up against the first half.
RSS_SLACK = 8 << 20  # bytes, plus 10 %
FD_SLACK = 2


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, host: Host, rng: random.Random) -> None:
        self.host, self.rng = host, rng
        self.guests: list = []  # (kind, handle, client or None)
        self.killed: set = set()  # pids the killer thread SIGKILLed, not yet replaced
        self.lock = threading.Lock()
        self.kills = self.respawns = self.echoes = self.calls = self.interrupted = 0
        self.bytes = {"inline": 0, "slot": 0, "mmap": 0}

    def spawn(self, kind: str) -> None:
        script = "echo.py" if kind == "echo" else "soak_rpc.py"
        h = self.host.spawn([sys.executable, os.path.join(GUESTS, script)])
        with self.lock:
            self.guests.append((kind, h, rpc.Client(h.link) if kind == "rpc" else None))

    def forget(self, entry) -> None:
        kind, h, client = entry
        with self.lock:
            self.guests.remove(entry)
            self.killed.discard(h.pid)
        if client is not None:
            client.close()
        h.kill()
        h.wait(CALL_TIMEOUT)

    def kill_one(self, rng: random.Random) -> None:
        """Killer thread: SIGKILL a random guest at a random instant, often mid-send or mid-call."""
        with self.lock:
            h = rng.choice(self.guests)[1]
            self.killed.add(h.pid)
        h.kill()
        self.kills += 1

    def replace_killed(self) -> None:
        for entry in [e for e in self.guests if e[1].pid in self.killed]:
            self.forget(entry)
            self.spawn(entry[0])
            self.respawns += 1

    def step(self) -> None:
        entry = self.rng.choice(self.guests)
        kind, h, client = entry
        try:
            if kind == "echo":
                tier = self.rng.choices(["inline", "slot", "mmap"], [60, 35, 5])[0]
                n = {"inline": self.rng.randint(1, 200), "slot": self.rng.randint(300, 60_000), "mmap": self.rng.randint(300_000, 2_000_000)}[tier]
                data = self.rng.randbytes(n)
                h.link.send(data, timeout=CALL_TIMEOUT)
                assert h.link.recv_bytes(timeout=CALL_TIMEOUT) == data, "echo mismatch"
                self.echoes += 1
                self.bytes[tier] += n
            elif self.rng.random() < 0.8:
                a, b = self.rng.randrange(1 << 30), self.rng.randrange(1 << 30)
                assert client.call("add", a, b, timeout=CALL_TIMEOUT) == a + b
                self.calls += 1
            else:
                n, seed = self.rng.randint(1, 200_000), self.rng.randrange(1 << 30)
                assert client.call("blob", n, seed, timeout=CALL_TIMEOUT) == random.Random(seed).randbytes(n)
                self.calls += 1
        except (PeerDead, HostGone, RpcError, ShmTimeout):
            if h.pid not in self.killed:
                raise
            self.interrupted += 1  # killed under this very operation: replaced below
        self.replace_killed()

    def sample(self, t0: float) -> dict:
        pool = self.host.stats()["pool"]
        return {
            "t": round(time.monotonic() - t0, 1),
            "rss": rss(),
            "fds": len(os.listdir("/proc/self/fd")),
            "free": [c["free"] for c in pool],
            "guests": len(self.host.guests),  # a guest killed since the last step may still count
            "killed_pending": len(self.killed),
        }


def flat(samples: list, key, slack) -> str | None:
    """None if key(sample) does not trend up from the first half to the second, else why."""
    half = len(samples) // 2
    a, b = [key(s) for s in samples[:half]], [key(s) for s in samples[half:]]
    if statistics.median(b) > slack(statistics.median(a)):
        return f"median {statistics.median(a)} -> {statistics.median(b)}"
    return None


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_soak():
    duration = float(os.environ.get("SHMHUB_SOAK_SECONDS", "3600"))
    warmup = min(60.0, duration / 4)
    rng = random.Random(17)
    samples: list = []
    with Host(CFG) as host:
        soak = Soak(host, rng)
        try:
            for kind in ["echo"] * ECHOES + ["rpc"] * RPCS:
                soak.spawn(kind)
            stop = threading.Event()

            def killer() -> None:
                krng = random.Random(18)
                while not stop.wait(krng.expovariate(1 / KILL_EVERY)):
                    soak.kill_one(krng)

            kt = threading.Thread(target=killer, daemon=True)
            t0 = time.monotonic()
            kt.start()
            next_sample = t0
            try:
                while time.monotonic() - t0 < duration:
                    soak.step()
                    now = time.monotonic()
                    if now >= next_sample:
                        samples.append(soak.sample(t0))
                        next_sample = now + SAMPLE_EVERY
            finally:
                stop.set()
                kt.join(CALL_TIMEOUT)
            soak.replace_killed()
            samples.append(soak.sample(t0))
            totals = {"total_slots": [c["slot_count"] for c in host.stats()["pool"]]}
        finally:
            for entry in list(soak.guests):
                soak.forget(entry)
    counts = {k: getattr(soak, k) for k in ("kills", "respawns", "echoes", "calls", "interrupted")}
    report = {"duration_s": duration, "warmup_s": warmup, **counts, "bytes": soak.bytes, **totals, "samples": samples}
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("SHMHUB_SOAK_REPORT"):
        with open(os.environ["SHMHUB_SOAK_REPORT"], "w") as f:
            f.write(text)
    steady = [s for s in samples if s["t"] >= warmup]
    assert len(steady) >= 4, f"too few samples after warm-up: {len(steady)}"
    assert soak.kills > 0 and soak.echoes > 0 and soak.calls > 0, counts
    problems = {
        "rss": flat(steady, lambda s: s["rss"], lambda m: m * 1.1 + RSS_SLACK),
        "fds": flat(steady, lambda s: s["fds"], lambda m: m + FD_SLACK),
    }
    for c in range(len(CFG.size_classes)):  # free slots never trend down (sampled between round trips)
        problems[f"free[{c}]"] = flat(steady, lambda s, c=c: -s["free"][c], lambda m: m + 2)
    bad = {k: v for k, v in problems.items() if v}
    assert not bad, f"resources trend upward: {bad}"
    assert samples[-1]["guests"] == ECHOES + RPCS, "a guest was not respawned"
    assert all(s["guests"] <= ECHOES + RPCS for s in steady), "a recovered guest is still counted"
