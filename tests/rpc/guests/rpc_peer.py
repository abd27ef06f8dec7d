"""A guest that serves the test handlers and calls the host back over the same link."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmhub  # noqa: E402
from shmhub import rpc  # noqa: E402
from handlers import HANDLERS  # noqa: E402

link = shmhub.connect()
server = rpc.Server({**HANDLERS, "callback": lambda x: client.call("host_double", x, timeout=10) + 1})
server.attach(link)  # serving before anything else: the host may call at once
client = rpc.Client(link)
try:
    server.serve(link)
finally:
    server.close()
    link.close()
