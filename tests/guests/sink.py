"""Consume a stream: argv = seed, count, inline_max, slot_max, slot_every. Checks every message in
order, then sends its link stats as JSON and waits for the host's goodbye."""

import json
import sys

import shmhub
from common import Stream

seed, count, inline_max, slot_max, slot_every = map(int, sys.argv[1:6])
stream = Stream(seed, count, inline_max, slot_max, slot_every)
link = shmhub.connect()
try:
    for seq in range(count):
        with link.recv(timeout=10) as msg:
            err = stream.check(seq, msg)
        if err:
            sys.exit(f"sink: {err}")
    link.send(json.dumps(link.stats.as_dict()).encode(), timeout=10)
    try:
        extra = link.recv(timeout=30)
        sys.exit(f"sink: extra message of {len(extra)} bytes")
    except shmhub.HostGone:
        pass
finally:
    link.close()
