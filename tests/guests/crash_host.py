"""A host process for the host-crash test: two guests, two-way streams, until it is SIGKILLed.

argv: OUTDIR [SEGMENT_PATH]   (no path: anonymous memfd segment)
Once both guests' streams run both ways it writes OUTDIR/host.json with its pid, the guests'
pids and the segment path, and goes on streaming. It exits by itself (code 5) only if nobody
kills it within 30 s; a wrong guest message exits 3.
"""

import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crash_payload as P  # noqa: E402
from shmhub import Host, SegmentConfig  # noqa: E402
from shmhub.errors import PeerDead  # noqa: E402

GUEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crash_orphan.py")
CONFIG = SegmentConfig(max_guests=2, bipbuf_capacity=16 * 1024, size_classes=((512, 48), (4096, 24), (16 * 1024, 16)))
LIFETIME = 30.0


def fail(code: int, what: str) -> None:
    sys.stderr.write(f"crash_host pid {os.getpid()}: {what}\n")
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    outdir = sys.argv[1]
    path = sys.argv[2] if len(sys.argv) > 2 else None
    host = Host(CONFIG, path)
    ready = []

    def serve(h, g_nonce, h_nonce, up):
        def send():
            seq = 0
            try:
                while True:
                    h.link.send(P.make(h_nonce, seq), timeout=LIFETIME)
                    seq += 1
            except PeerDead:
                fail(3, f"guest {h.peer_id} died under a live host")
            except BaseException:
                fail(3, "host sender: " + traceback.format_exc())

        threading.Thread(target=send, daemon=True).start()
        seq = 0
        try:
            while True:
                with h.link.recv(timeout=LIFETIME) as msg:
                    if P.check(msg, g_nonce, seq):
                        up.set()  # the guest verified host messages: both directions run
                seq += 1
        except BaseException:
            fail(3, "host receiver: " + traceback.format_exc())

    for i in range(2):
        g_nonce, h_nonce = 0x30000 + 2 * i, 0x30001 + 2 * i
        h = host.spawn([sys.executable, GUEST, outdir, str(g_nonce), str(h_nonce)])
        up = threading.Event()
        ready.append((h, up))
        threading.Thread(target=serve, args=(h, g_nonce, h_nonce, up), daemon=True).start()
    for h, up in ready:
        if not up.wait(LIFETIME):
            fail(4, f"guest {h.peer_id} never streamed both ways")
    info = {"host_pid": os.getpid(), "guests": [h.pid for h, _ in ready], "segment": path}
    tmp = os.path.join(outdir, ".host.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.rename(tmp, os.path.join(outdir, "host.json"))
    time.sleep(LIFETIME)
    fail(5, f"nobody killed the host within {LIFETIME} s")


if __name__ == "__main__":
    main()
