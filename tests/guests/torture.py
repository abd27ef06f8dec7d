"""Lost-wakeup torture, guest side: argv = seed, count. One thread sends `count` messages of the
guest stream (seed + 1), another receives and checks the host's stream (seed), both with blocking
calls that time out. Exit 0 only if everything arrived, in order, once, and the host then said
goodbye with nothing extra in between."""

import json
import sys
import threading
import time

import shmhub
from common import Stream

seed, count = int(sys.argv[1]), int(sys.argv[2])
link = shmhub.connect()
inline_max = link.segment.inline_threshold
slot_max = link.segment.config.max_slot_payload
rx_stream = Stream(seed, count, inline_max, slot_max)
tx_stream = Stream(seed + 1, count, inline_max, slot_max)
errors = []


def sender():
    try:
        for seq in range(count):
            link.send(tx_stream.message(seq), timeout=10)
    except Exception as e:
        errors.append(f"guest sender at seq {seq}: {type(e).__name__}: {e}")


def receiver():
    try:
        for seq in range(count):
            with link.recv(timeout=10) as msg:
                err = rx_stream.check(seq, msg)
            if err:
                errors.append(f"guest receiver: {err}")
                return
    except Exception as e:
        errors.append(f"guest receiver at seq {seq}: {type(e).__name__}: {e}")


t0 = time.monotonic()
threads = [threading.Thread(target=sender), threading.Thread(target=receiver)]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
    if t.is_alive():
        errors.append(f"guest thread {t.name} hung")
        sys.stderr.write("\n".join(errors) + "\n")
        import os

        os._exit(4)
try:
    if not errors:
        try:
            extra = link.recv(timeout=60)
            errors.append(f"guest got an extra message of {len(extra)} bytes after {count}")
        except shmhub.HostGone:
            pass
finally:
    sys.stderr.write(json.dumps({"guest_torture_s": round(time.monotonic() - t0, 2), "stats": link.stats.as_dict()}) + "\n")
    link.close()
if errors:
    sys.stderr.write("\n".join(errors) + "\n")
    sys.exit(1)
