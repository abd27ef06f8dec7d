"""Guest-side timeouts while the host never sends nor reads: argv = JSON list of timeouts.
recv(timeout=t) on an empty link, send(timeout=t) with every slot taken, send(timeout=t) into a
full ring: each raises ShmTimeout (a TimeoutError) after t and before 2t; and during 0.2 s waits
of each kind a counting thread keeps >= 30% of the speed it has during time.sleep(0.2).
Exit 0 if all hold; the failures on stderr."""

import json
import sys
import time

import shmhub
from common import gil_ratio

timeouts = json.loads(sys.argv[1])
GIL_T = 0.2
link = shmhub.connect()
slot_n = link.segment.inline_threshold + 1
failures = []


def timed(what, t, fn):
    t0 = time.monotonic()
    try:
        fn()
        failures.append(f"{what} t={t}: returned instead of timing out")
    except shmhub.ShmTimeout as e:
        if not isinstance(e, TimeoutError):
            failures.append(f"{what} t={t}: ShmTimeout is not a TimeoutError")
    except Exception as e:
        failures.append(f"{what} t={t}: raised {e!r}, not ShmTimeout")
    elapsed = time.monotonic() - t0
    if not t <= elapsed < 2 * t:
        failures.append(f"{what} t={t}: took {elapsed:.3f} s")


def gil(what, fn):
    """The wait lets a counting thread run at >= 30% of its speed during time.sleep."""
    ratio, waits = gil_ratio(fn, GIL_T)
    for elapsed, err in waits:
        if not isinstance(err, shmhub.ShmTimeout) or elapsed < GIL_T:
            failures.append(f"{what} (GIL check): {err!r} after {elapsed:.3f} s")
    if ratio < 0.3:
        failures.append(f"{what}: counter ran at {ratio:.0%} of its speed during time.sleep")


def check(what, fn):
    for t in timeouts:
        timed(what, t, lambda: fn(t))
    gil(what, fn)


try:
    check("recv", lambda t: link.recv(timeout=t))
    # every slot of the pool, then slot sends that must wait for one
    nslots = sum(c for _, c in link.segment.config.size_classes)
    for _ in range(nslots):
        link.send(bytes(slot_n), timeout=1)
    check("send (no free slot)", lambda t: link.send(bytes(slot_n), timeout=t))
    if link.stats.slot_exhaustion_waits != len(timeouts) + 3:
        failures.append(f"slot_exhaustion_waits = {link.stats.slot_exhaustion_waits}")
    # fill the ring with 8-byte frames, then inline sends that must wait for room
    while True:
        try:
            link.send(b"", timeout=0)
        except shmhub.ShmTimeout:
            break
    check("send (ring full)", lambda t: link.send(b"x", timeout=t))
finally:
    link.close()
if failures:
    sys.exit("\n".join(failures))
