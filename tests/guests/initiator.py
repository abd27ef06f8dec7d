"""Guest-initiated traffic: argv = seed, JSON list of sizes, JSON list of sizes that must raise
PayloadTooLarge. Phase 1 sends each payload and waits for its echo (ping-pong); phase 2 sends
them all from a second thread while the main thread receives the echoes. Every echo is checked
byte for byte; a JSON report goes to the host last. Exit 0 after the host's goodbye."""

import json
import sys
import threading

import shmhub
from common import payload

seed, sizes, too_large = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
link = shmhub.connect()
inline_max = link.segment.inline_threshold
slot_max = link.segment.config.max_slot_payload
errors = []


def check_echo(seq, n):
    expected = payload(seed, seq, n)
    with link.recv(timeout=20) as echo:
        tier = "inline" if n <= inline_max else "slot" if n <= slot_max else "mmap"
        if echo.tier != tier:
            errors.append(f"echo of {n} bytes came as {echo.tier}, expected {tier}")
        if len(echo) != n or memoryview(echo) != expected:
            errors.append(f"echo of seq {seq} ({n} bytes) differs from what was sent ({len(echo)} bytes)")


try:
    for n in too_large:
        try:
            link.send(bytes(n), timeout=10)
            errors.append(f"send of {n} bytes did not raise PayloadTooLarge")
        except shmhub.PayloadTooLarge:
            pass
    for seq, n in enumerate(sizes):  # phase 1: ping-pong
        link.send(payload(seed, seq, n), timeout=20)
        check_echo(seq, n)
    base = len(sizes)

    def sender():
        try:
            for i, n in enumerate(sizes):
                link.send(payload(seed, base + i, n), timeout=20)
        except Exception as e:  # reported below
            errors.append(f"sender thread: {type(e).__name__}: {e}")

    t = threading.Thread(target=sender)
    t.start()
    for i, n in enumerate(sizes):  # phase 2: pipelined
        check_echo(base + i, n)
    t.join(30)
    if t.is_alive():
        errors.append("sender thread hung")
    link.send(json.dumps({"errors": errors, "stats": link.stats.as_dict()}).encode(), timeout=20)
    try:
        extra = link.recv(timeout=30)
        sys.exit(f"initiator: unexpected message of {len(extra)} bytes after the last echo")
    except shmhub.HostGone:
        pass
finally:
    link.close()
sys.exit(1 if errors else 0)
