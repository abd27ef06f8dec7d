"""A guest that calls the host: argv[1] calls of "big" in flight, then it waits to be killed."""

from __future__ import annotations

import sys
import time

import shmhub
from shmhub import rpc

link = shmhub.connect()
client = rpc.Client(link)
futs = [client.submit("big", i) for i in range(int(sys.argv[1]))]
client.call("ready", timeout=30)
time.sleep(60)  # killed by the test long before
