"""Guest-side timeouts while the host never sends nor reads: argv = JSON list of timeouts.
recv(timeout=t) on an empty link, send(timeout=t) with every slot taken, send(timeout=t) into a
full ring: each raises ShmTimeout (a TimeoutError) after t and before 2t, and a counting thread
keeps >= 30% of its free-running speed meanwhile. Exit 0 if all hold; the failures on stderr."""
import json
import sys
import time

import shmhub
from common import gil_progress

timeouts = json.loads(sys.argv[1])
link = shmhub.connect()
slot_n = link.segment.inline_threshold + 1
failures = []


def check(what, t, fn):
    base_rate, _, _ = gil_progress(lambda: time.sleep(t))
    rate, elapsed, err = gil_progress(fn)
    if not isinstance(err, shmhub.ShmTimeout) or not isinstance(err, TimeoutError):
        failures.append(f"{what} t={t}: raised {err!r}, not ShmTimeout")
    if not t <= elapsed < 2 * t:
        failures.append(f"{what} t={t}: took {elapsed:.3f} s")
    if rate < 0.3 * base_rate:
        failures.append(f"{what} t={t}: counter ran at {rate / base_rate:.0%} of its speed during time.sleep")


try:
    for t in timeouts:
        check("recv", t, lambda: link.recv(timeout=t))
    # every slot of the pool, then a slot send that must wait for one
    nslots = sum(c for _, c in link.segment.config.size_classes)
    for _ in range(nslots):
        link.send(bytes(slot_n), timeout=1)
    for t in timeouts:
        check("send (no free slot)", t, lambda: link.send(bytes(slot_n), timeout=t))
    if link.stats.slot_exhaustion_waits != len(timeouts):
        failures.append(f"slot_exhaustion_waits = {link.stats.slot_exhaustion_waits}")
    # fill the ring with 8-byte frames, then an inline send that must wait for room
    while True:
        try:
            link.send(b"", timeout=0)
        except shmhub.ShmTimeout:
            break
    for t in timeouts:
        check("send (ring full)", t, lambda: link.send(b"x", timeout=t))
finally:
    link.close()
if failures:
    sys.exit("\n".join(failures))
