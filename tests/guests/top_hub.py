"""A hub for the `shmhub top` tests: a host and N guests streaming both ways at a modest pace.

argv: N. Prints one JSON line {"host": pid, "guests": {peer_id: pid}} once every guest has sent,
then serves until its stdin closes; exit 0.
"""

import json
import os
import sys
import threading

import shmhub


def guest() -> None:
    link = shmhub.connect()
    small, big = b"s" * 200, b"b" * 3000  # one inline, one through a slot
    try:
        while True:
            link.send(small, timeout=10)
            link.send(big, timeout=10)
            while (msg := link.try_recv()) is not None:
                msg.release()
            threading.Event().wait(0.002)  # a modest pace: three guests must not fill two cores
    except (shmhub.HostGone, shmhub.LinkClosed):
        pass
    finally:
        link.close()


def host(n: int) -> None:
    cfg = shmhub.SegmentConfig(max_guests=4, bipbuf_capacity=1 << 16)
    with shmhub.Host(cfg) as h:
        guests = [h.spawn([sys.executable, __file__, "guest"]) for _ in range(n)]
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        seen = set()
        count = 0
        while not stop.is_set():
            try:
                g, msg = h.recv_any(timeout=0.1)
            except shmhub.ShmTimeout:
                continue
            msg.release()
            count += 1
            if count % 4 == 0:
                try:
                    g.link.try_send(b"a" * 500)
                except shmhub.PeerDead:
                    pass
            if len(seen) < n:
                seen.add(g.peer_id)
                if len(seen) == n:
                    print(json.dumps({"host": os.getpid(), "guests": {x.peer_id: x.pid for x in guests}}), flush=True)


if __name__ == "__main__":
    guest() if sys.argv[1] == "guest" else host(int(sys.argv[1]))
