"""Send argv[1] messages b"hello <i>", one every 0.2 s, without being asked; then wait for the
host's goodbye."""

import sys
import time

import shmhub

link = shmhub.connect()
try:
    for i in range(int(sys.argv[1])):
        time.sleep(0.2)
        link.send(b"hello %d" % i, timeout=10)
    try:
        link.recv(timeout=30)
        sys.exit("greeter: unexpected message")
    except shmhub.HostGone:
        pass
finally:
    link.close()
