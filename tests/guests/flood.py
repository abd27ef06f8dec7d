"""Stream to the host as fast as the ring allows until HostGone: argv = seed (the guest stream)."""

import sys

import shmhub
from common import Stream

link = shmhub.connect()
stream = Stream(int(sys.argv[1]), 50_000, 48, 48, 0)
try:
    for seq in range(stream.count):
        link.send(stream.message(seq), timeout=10)
    sys.exit("flood: ran out of messages before the host's goodbye")
except shmhub.HostGone:
    pass
finally:
    link.close()
