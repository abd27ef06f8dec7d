"""Guest for the host-crash test: streams to the host and receives from it until the host is gone.

argv: OUTDIR GUEST_NONCE HOST_NONCE
The first thread to get HostGone / PeerDead records the instant (time.monotonic_ns, the same
clock in every process) in OUTDIR/guest-<pid>.json, then the guest exits 0. Anything else
(a wrong host message, a timeout, another exception) is recorded and exits 4.
"""

import json
import os
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import crash_payload as P  # noqa: E402
import shmhub  # noqa: E402
from shmhub.errors import HostGone, PeerDead  # noqa: E402

TIMEOUT = 20.0


def main() -> None:
    outdir = sys.argv[1]
    g_nonce, h_nonce = int(sys.argv[2]), int(sys.argv[3])
    link = shmhub.connect()
    lock = threading.Lock()
    counts = {"sent": 0, "received": 0}
    verified = [0]

    def finish(code: int, **info) -> None:
        with lock:  # the first thread to finish reports; the other never gets here again
            info.update(pid=os.getpid(), peer_id=link.peer_id, **counts)
            tmp = os.path.join(outdir, f".guest-{os.getpid()}.tmp")
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.rename(tmp, os.path.join(outdir, f"guest-{os.getpid()}.json"))
            os._exit(code)

    def send() -> None:
        try:
            seq = 0
            while True:
                link.send(P.make(g_nonce, seq, verified[0]), timeout=TIMEOUT)
                seq += 1
                counts["sent"] = seq
        except (HostGone, PeerDead) as e:
            finish(0, noticed_ns=time.monotonic_ns(), error=type(e).__name__, by="send")
        except BaseException:
            finish(4, noticed_ns=0, error="unexpected", by="send", detail=traceback.format_exc())

    threading.Thread(target=send, daemon=True).start()
    try:
        seq = 0
        while True:
            with link.recv(timeout=TIMEOUT) as msg:
                P.check(msg, h_nonce, seq)
            seq += 1
            counts["received"] = verified[0] = seq
    except (HostGone, PeerDead) as e:
        finish(0, noticed_ns=time.monotonic_ns(), error=type(e).__name__, by="recv")
    except BaseException:
        finish(4, noticed_ns=0, error="unexpected", by="recv", detail=traceback.format_exc())


if __name__ == "__main__":
    main()
