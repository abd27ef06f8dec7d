"""Guest for the size sweep of tests/link/test_mmap.py. Commands arrive as inline JSON messages;
a data message follows "echo" and "digest". Every reply is an inline JSON report.

  {"op": "echo"}            next message: report its tier/length/digest/slot classes, send it back
                            (a true echo: the same bytes, re-sent from the received view), release it
  {"op": "digest"}          next message: report as above, release it (no echo: for the biggest sizes)
  {"op": "gen", "seed": s, "n": n}   build content(s, n) here and send it (a guest-initiated send);
                            "hash": false skips hashing our own copy (the host knows the digest)
  {"op": "stat"}            RSS, fd count, mmap bookkeeping

Exits 0 when the host says goodbye."""

import json
import sys
import time

import mmap_content as mc
from shmhub import HostGone, connect


def classes_in_use(link):
    pool = link.segment.pool
    return [pool.counts(c)[1] for c in range(pool.num_classes)]


def describe(link, msg):
    t0 = time.perf_counter()
    h = mc.hash_of(msg)
    return {"n": len(msg), "tier": msg.tier, "digest": h, "hash_s": time.perf_counter() - t0, "slots_in_use": classes_in_use(link), "mappings": link.mappings}


def main() -> int:
    link = connect()
    try:
        while True:
            with link.recv(timeout=60) as cmd_msg:
                cmd = json.loads(bytes(cmd_msg))
            op = cmd["op"]
            if op in ("echo", "digest"):
                msg = link.recv(timeout=60)
                report = describe(link, msg)
                if op == "echo":
                    t0 = time.perf_counter()
                    link.send(msg, timeout=60)
                    report["echo_s"] = time.perf_counter() - t0
                msg.release()  # before the report: the host counts slots in use after reading it
                del msg
            elif op == "gen":
                t0 = time.perf_counter()
                data = mc.content(cmd["seed"], cmd["n"])
                t1 = time.perf_counter()
                mine = mc.hash_of(data) if cmd.get("hash", True) else None
                t2 = time.perf_counter()
                link.send(data, timeout=60)
                t3 = time.perf_counter()
                del data
                report = {"digest": mine, "gen_s": t1 - t0, "hash_s": t2 - t1, "send_s": t3 - t2}
            elif op == "stat":
                report = {"rss_kib": mc.rss_kib(), "fds": mc.fd_count(), "mappings": link.mappings, "map_inodes": sorted(mc.map_inodes())}
            else:
                raise SystemExit(f"unknown op {op!r}")
            link.send(json.dumps(report).encode(), timeout=60)
    except HostGone:
        return 0
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
