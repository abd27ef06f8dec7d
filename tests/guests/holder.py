"""Receive two slot messages, close the link while still holding them, then release one
explicitly and one by leaving a with block: neither may raise. Exit 0 if all holds."""

import sys

import shmhub

link = shmhub.connect()
a = link.recv(timeout=20)
with link.recv(timeout=20) as b:
    if (a.tier, b.tier) != ("slot", "slot"):
        sys.exit(f"holder: tiers {a.tier}, {b.tier}")
    link.close()
    if a.tobytes() != b"a" * 600 or b.tobytes() != b"b" * 600:  # still mapped
        sys.exit("holder: content changed")
    a.release()
if not (a.released and b.released):
    sys.exit("holder: not released")
