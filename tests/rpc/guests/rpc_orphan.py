"""A guest with calls to the host in flight when the host goes: prints how each call ended and
how long after the host's goodbye, then exits."""

from __future__ import annotations

import concurrent.futures as cf
import time

import shmhub
from shmhub import rpc

link = shmhub.connect()
client = rpc.Client(link)
futs = [client.submit("stall") for _ in range(8)]
client.call("ready", timeout=30)
done, pending = cf.wait(futs, 30)
t_end = time.monotonic_ns()
kinds = sorted({type(f.exception()).__name__ for f in done})
try:
    client.call("ready", timeout=5)
    later = "succeeded"
except shmhub.HostGone:
    later = "HostGone"
print(f"{len(done)} {len(pending)} {','.join(kinds)} {later} {t_end}", flush=True)
link.close()
