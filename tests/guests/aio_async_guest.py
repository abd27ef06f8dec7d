"""asyncio guest: after a b"HELLO" (arecv), answers every request (aio_proto) with asend from an
`async for` over its link; b"END" gets the number served. The loop ends when the host is gone, and
the guest exits 0 only then."""

import asyncio
import sys

import shmhub
from aio_proto import check_request, reply_to

TIMEOUT = 60


async def main() -> int:
    link = shmhub.connect()
    try:
        with await link.arecv(timeout=TIMEOUT) as hello:
            if hello.tobytes() != b"HELLO":
                print(f"expected HELLO, got {hello.tobytes()!r}", file=sys.stderr)
                return 3
        served = 0
        async for msg in link:
            with msg:
                data = msg.tobytes()
            if data == b"END":
                await link.asend(str(served).encode(), timeout=TIMEOUT)
                continue
            check_request(data, link.peer_id, served)
            await link.asend(reply_to(data), timeout=TIMEOUT)
            served += 1
        return 0  # the host said goodbye
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
