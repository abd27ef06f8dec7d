"""A busy guest: argv = result file, seed. One thread streams the guest stream (seed + 1) to the
host, another receives and checks the host's stream (seed), both blocking, until HostGone: the
receiver drains what the host sent before its goodbye. Writes {"received", "sent", "errors"}
to the result file; exit 0 when both threads ended on HostGone and nothing was wrong."""

import json
import sys
import threading

import shmhub
from common import Stream

result, seed = sys.argv[1], int(sys.argv[2])
link = shmhub.connect()
inline_max, slot_max = link.segment.inline_threshold, link.segment.config.max_slot_payload
rx, tx = Stream(seed, 50_000, inline_max, slot_max), Stream(seed + 1, 50_000, inline_max, slot_max)
state = {"received": 0, "sent": 0, "errors": []}


def sender():
    try:
        while True:
            link.send(tx.message(state["sent"]), timeout=10)
            state["sent"] += 1
    except shmhub.HostGone:
        pass
    except Exception as e:
        state["errors"].append(f"sender: {type(e).__name__}: {e}")


def receiver():
    try:
        while True:
            with link.recv(timeout=10) as msg:
                err = rx.check(state["received"], msg)
            if err:
                state["errors"].append(f"receiver: {err}")
                return
            state["received"] += 1
    except shmhub.HostGone:
        pass
    except Exception as e:
        state["errors"].append(f"receiver: {type(e).__name__}: {e}")


threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
for t in threads:
    t.start()
for t in threads:
    t.join(60)
    if t.is_alive():
        state["errors"].append("a thread hung")
link.close()
with open(result, "w") as f:
    json.dump(state, f)
sys.exit(1 if state["errors"] else 0)
