"""The child side of a shmhub benchmark pair: `python -m benchmarks.child SCENARIO PARAMS_JSON`."""

import json
import sys

import shmhub

from .scenarios import SIDES, handshake_b
from .transports import Shmhub, pin


def main() -> None:
    scenario, params = sys.argv[1], json.loads(sys.argv[2])
    pin(1)
    link = shmhub.connect(spin_ns=params.get("spin_ns", shmhub.link.DEFAULT_SPIN_NS))
    try:
        t = Shmhub(link, params.get("size", 0))
        handshake_b(t)
        SIDES[scenario][1](t, params)
    finally:
        link.close()


if __name__ == "__main__":
    main()
