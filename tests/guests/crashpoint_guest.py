"""A guest for the kill-anywhere tests (tests/crashpoints): a workload that passes every crash point
of its kind. Run under SHMHUB_CRASH_AT=name:count (a crash-point build), it aborts there; it exits 0
only if the point was never reached, which the test reports.

argv: [--sync] mode (traffic | bootstrap SOCKET_PATH | rpc | growth | mmap) and the number of rounds.
The random-instant kill tests use it too, with --sync and without crash points."""

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


def wait_go() -> None:
    """--sync: say we are ready (a line on stdout), then wait for the host's go (a line on stdin):
    the random-instant kills land in the phase that follows, not in the interpreter's start-up."""
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        raise SystemExit("no go")


def main() -> None:
    sync = "--sync" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--sync"]
    mode, rounds = args[0], int(args[-1])
    if sync and mode == "bootstrap":
        wait_go()  # the kill lands in the bootstrap
    link = shmhub.connect(args[1]) if mode == "bootstrap" else shmhub.connect()
    if sync and mode != "bootstrap":
        wait_go()
    try:
        if mode in ("growth", "mmap"):  # slot payloads only (the classes must grow) / mappings only
            sizes = (3000, 9000) if mode == "growth" else (200_000, 500_000)
            for i in range(rounds):
                data = payload(i)[:1] * sizes[i % 2]
                link.send(data, timeout=T)
                with link.recv(timeout=T) as msg:
                    if bytes(msg) != data:
                        raise SystemExit(f"echo {i} differs")
            return
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
