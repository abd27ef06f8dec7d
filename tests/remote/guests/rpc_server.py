"""A remote guest serving the rpc tests' handlers over TCP until the host is gone. argv: URL LIVENESS"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rpc"))

import shmhub  # noqa: E402
from handlers import HANDLERS  # noqa: E402
from shmhub import rpc  # noqa: E402

link = shmhub.connect(sys.argv[1], name="rpc", liveness=float(sys.argv[2]))
rpc.serve(link, HANDLERS)
