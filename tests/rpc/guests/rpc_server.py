"""A guest that serves the test handlers over its link until the host is gone.
argv: [max_concurrency] [codec]"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmhub  # noqa: E402
from shmhub import rpc  # noqa: E402
from handlers import HANDLERS  # noqa: E402

conc = int(sys.argv[1]) if len(sys.argv) > 1 else 32
codec = sys.argv[2] if len(sys.argv) > 2 else None
link = shmhub.connect(spin_ns=int(os.environ.get("RPC_SPIN_NS", "50000")))
try:
    rpc.serve(link, HANDLERS, max_concurrency=conc, codec=codec)
finally:
    link.close()
