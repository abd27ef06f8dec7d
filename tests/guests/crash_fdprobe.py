"""Guest for the fd-hygiene tests: reports the fds it inherited and the fds it holds once connected.

Its first message to the host is JSON: {"pid", "env" (the SHMHUB_GUEST spec), "at_start" (fd ->
readlink target, listed before anything else runs), "connected" (the same after connect())}.
Then it waits for the host to go away (exit 0); any other end exits 4.
"""

import os


def listing():
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the directory fd listdir used, closed by now
            pass
    return out


AT_START = listing()  # first thing: nothing of ours is open yet

import json  # noqa: E402
import sys  # noqa: E402

import shmhub  # noqa: E402
from shmhub.errors import HostGone, PeerDead  # noqa: E402

TIMEOUT = 30.0


def main() -> None:
    env = json.loads(os.environ["SHMHUB_GUEST"])
    link = shmhub.connect()
    report = {"pid": os.getpid(), "env": env, "at_start": AT_START, "connected": listing()}
    link.send(json.dumps(report).encode(), timeout=TIMEOUT)
    try:
        while True:
            link.recv(timeout=TIMEOUT).release()
    except (HostGone, PeerDead):
        os._exit(0)
    except BaseException as e:
        sys.stderr.write(f"crash_fdprobe {os.getpid()}: {type(e).__name__}: {e}\n")
        os._exit(4)


if __name__ == "__main__":
    main()
