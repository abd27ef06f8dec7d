"""A guest for the kill-anywhere tests (tests/crashpoints): a workload that passes every crash point
of its kind. Run under SHMHUB_CRASH_AT=name:count (a crash-point build), it aborts there; it exits 0
only if the point was never reached, which the test reports.

argv: mode (traffic | bootstrap SOCKET_PATH | rpc) and the number of rounds."""
import resource
import sys
import time

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # abort() leaves no core file behind

import shmhub  # noqa: E402
from shmhub import rpc  # noqa: E402

T = 20.0
BURST = 3  # messages in flight each way: the echoes can wrap the ring under the reader
# inline, slot (4 KiB class), slot, mmap (above the largest slot), inline, slot (16 KiB class)
SIZES = (16, 3000, 3000, 200_000, 40, 9000)


def payload(i: int) -> bytes:
    n = SIZES[i % len(SIZES)]
    return (i.to_bytes(4, "little") * (n // 4 + 1))[:n]


def main() -> None:
    mode, rounds = sys.argv[1], int(sys.argv[-1])
    link = shmhub.connect(sys.argv[2]) if mode == "bootstrap" else shmhub.connect()
    try:
        if mode == "rpc":
            client = rpc.Client(link)  # out-of-band buffers: staged in slots / mappings, then the header
            for i in range(rounds):
                a, b = payload(6 * i + 1), payload(6 * i + 3)
                assert client.call("sink", a, b, timeout=T) == len(a) + len(b)
            client.close()
            return
        for i in range(0, rounds, BURST):  # the host echoes every message
            for j in range(i, i + BURST):
                link.send(payload(j), timeout=T)
            time.sleep(0.005)  # the echoes are written (and the ring wrapped) before we read
            for j in range(i, i + BURST):
                with link.recv(timeout=T) as msg:
                    if bytes(msg) != payload(j):
                        raise SystemExit(f"echo {j} differs")
    finally:
        link.close()


if __name__ == "__main__":
    main()
