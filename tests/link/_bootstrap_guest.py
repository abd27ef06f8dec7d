"""A walk-in guest process for test_bootstrap.py.

usage: _bootstrap_guest.py SOCKET INDEX SIZES [hang]

Connects over the bootstrap socket, sends one payload per size in SIZES (comma-separated), checks
that each reply is the payload reversed, prints its link stats as JSON and leaves (link.close()).
With "hang": sends one message, then blocks on recv until it is killed.
"""

from __future__ import annotations

import json
import random
import struct
import sys

HDR = struct.Struct("<III")  # guest index, sequence, total length


def payload(idx: int, seq: int, n: int) -> bytes:
    """Deterministic content both sides can rebuild from the header alone."""
    return HDR.pack(idx, seq, n) + random.Random(idx * 1_000_003 + seq).randbytes(n - HDR.size)


def main() -> int:
    import shmhub

    sock, idx, sizes = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    hang = sys.argv[4:] == ["hang"]
    link = shmhub.connect(sock, timeout=30)
    try:
        for seq, n in enumerate(sizes):
            data = payload(idx, seq, n)
            link.send(data, timeout=30)
            if hang:
                print(json.dumps({"peer_id": link.peer_id}), flush=True)
                link.recv(timeout=None)  # until killed
            reply = link.recv_bytes(timeout=30)
            if reply != data[::-1]:
                print(json.dumps({"error": f"reply {seq} of {len(reply)} bytes does not match"}), flush=True)
                return 3
        stats = link.stats.as_dict()
        print(json.dumps({"peer_id": link.peer_id, "doorbell": link.doorbell is not None, **stats}), flush=True)
        return 0
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
