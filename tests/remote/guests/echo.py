"""A remote guest: connects to argv[1], echoes every payload until the host is gone."""

import sys

import shmhub
from shmhub.errors import HostGone

link = shmhub.connect(sys.argv[1], name="echo", liveness=float(sys.argv[2]) if len(sys.argv) > 2 else 1.5)
try:
    for msg in link:
        with msg:
            link.send(msg)
except HostGone:
    pass
link.close()
