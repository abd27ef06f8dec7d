"""Attach, never read or send, leave when the host says goodbye (a consumer that never consumes)."""

import time

import shmhub

link = shmhub.connect()
deadline = time.monotonic() + 60
try:
    while not link.segment.host_goodbye:
        if time.monotonic() > deadline:
            raise SystemExit("idle guest: no goodbye within 60 s")
        time.sleep(0.01)
finally:
    link.close()
