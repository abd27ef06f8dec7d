"""Blocking guest that reads nothing until the host writes a line to its stdin, so the host can fill
its ring or exhaust the slot pool. Then it receives numbered messages (aio_proto.sink_msg) until
b"END", checks each one, answers with the count, and exits 0 once the host is gone."""

import select
import sys

import shmhub
from aio_proto import check_sink_msg

TIMEOUT = 60


def main() -> int:
    link = shmhub.connect(spin_ns=0)
    try:
        if not select.select([sys.stdin], [], [], TIMEOUT)[0] or not sys.stdin.readline():
            print("no go line on stdin", file=sys.stderr)
            return 3
        count = 0
        while True:
            with link.recv(timeout=TIMEOUT) as msg:
                data = msg.tobytes()
            if data == b"END":
                link.send(str(count).encode(), timeout=TIMEOUT)
                break
            check_sink_msg(data, count)
            count += 1
        try:
            link.recv(timeout=TIMEOUT).release()
            print("unexpected message after END", file=sys.stderr)
            return 4
        except shmhub.HostGone:
            return 0
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
