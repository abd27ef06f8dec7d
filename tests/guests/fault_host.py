"""A host for the host-kill fault test: argv OUTDIR SEGMENT_PATH. Spawns a guest blocked on a full
ring (never read) and a guest sending in a tight loop (read and checked), writes OUTDIR/host.json
with the pids once both are mid-send, and serves until it is SIGKILLed (exits 5 after 30 s)."""

import json
import os
import struct
import sys
import threading
import time

from shmhub import Host, SegmentConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=4096, size_classes=((256, 16),))


def main() -> None:
    outdir, path = sys.argv[1], sys.argv[2]
    host = Host(CONFIG, path)
    argv = [sys.executable, os.path.join(HERE, "fault_guest.py")]
    blocked = host.spawn(argv + ["blocked", os.path.join(outdir, "blocked.json")])
    loop = host.spawn(argv + ["loop", os.path.join(outdir, "loop.json")])

    def drain() -> None:
        seq = 0
        while True:
            data = loop.link.recv_bytes(timeout=30)
            if data != struct.pack("<I", seq) * 16:
                os._exit(3)  # a lost or reordered message
            seq += 1

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + 20
    while not all(os.path.exists(os.path.join(outdir, n)) for n in ("blocked.json.blocked", "loop.json.running")):
        if time.monotonic() > deadline:
            os._exit(4)
        time.sleep(0.01)
    with open(os.path.join(outdir, ".host.tmp"), "w") as f:
        json.dump({"host_pid": os.getpid(), "guests": [blocked.pid, loop.pid]}, f)
    os.rename(os.path.join(outdir, ".host.tmp"), os.path.join(outdir, "host.json"))
    time.sleep(30)
    os._exit(5)


if __name__ == "__main__":
    main()
