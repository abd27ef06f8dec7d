"""A guest that serves the test handlers and calls the host back over the same link."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmhub  # noqa: E402
from shmhub import rpc  # noqa: E402
from handlers import HANDLERS  # noqa: E402

import threading  # noqa: E402

link = shmhub.connect()
made = threading.Event()
clients = []


def callback(x):
    made.wait(10)  # the host may call before this process has made its client
    return clients[0].call("host_double", x, timeout=10) + 1


server = rpc.Server({**HANDLERS, "callback": callback})
server.attach(link)  # serving before anything else: the host may call at once
clients.append(rpc.Client(link))
made.set()
try:
    server.serve(link)
finally:
    server.close()
    link.close()
