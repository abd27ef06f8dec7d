"""Blocking guest: sends N requests (keeping up to W in flight), checks every reply, exits 0.
argv: N W"""

import sys

import shmhub
from aio_proto import check_reply, request

TIMEOUT = 60


def main() -> int:
    n, window = int(sys.argv[1]), int(sys.argv[2])
    link = shmhub.connect(spin_ns=0)
    peer = link.peer_id
    try:
        sent = got = 0
        while got < n:
            while sent < n and sent - got < window:
                link.send(request(peer, sent), timeout=TIMEOUT)
                sent += 1
            with link.recv(timeout=TIMEOUT) as msg:
                check_reply(msg.tobytes(), peer, got)
            got += 1
        return 0
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
