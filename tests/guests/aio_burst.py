"""Blocking guest: sends argv[1] numbered messages, then closes its link and exits 0."""

import sys

import shmhub
from aio_proto import sink_msg


def main() -> int:
    link = shmhub.connect()
    try:
        for seq in range(int(sys.argv[1])):
            link.send(sink_msg(seq, 64 if seq % 3 else 2000), timeout=60)
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
