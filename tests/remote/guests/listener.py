"""A host in a process of its own: listens on 127.0.0.1, prints its endpoint, accepts one guest,
sends it b"ready", then waits to be killed. argv: LIVENESS"""

import sys
import time

from shmhub.remote import Listener

lis = Listener("tcp://127.0.0.1:0", liveness=float(sys.argv[1]))
print(lis.endpoint, flush=True)
g = lis.accept(timeout=30)
g.link.send(b"ready")
time.sleep(60)
