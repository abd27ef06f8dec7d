"""Blocking guest: echoes every message until the host is gone, then exits 0."""

import sys

import shmhub


def main() -> int:
    link = shmhub.connect()
    try:
        while True:
            try:
                msg = link.recv(timeout=60)
            except shmhub.HostGone:
                return 0
            with msg:
                link.send(msg, timeout=60)
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
