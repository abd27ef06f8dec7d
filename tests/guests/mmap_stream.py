"""Guest for the streaming / crash tests of tests/link/test_mmap.py. Commands are inline JSON.

Stream payloads are content(seed, n) with the sequence number (u64) in the first and last 8
bytes; the receiver checks both and compares everything in between with its own copy.

  {"op": "sink", "n": n, "seed": s}   from now on every non-inline message is a stream payload:
                                     check it (sequence, length, tier, content) and release it
  {"op": "stat"}                     report counts, errors, RSS, fds, mmap bookkeeping
  {"op": "source", "seconds": t}     send stream payloads (n, seed of the last "sink") for t
                                     seconds, then report {"sent": count, ...}
  {"op": "hold", "k": k}             keep the next k stream payloads unreleased, send k stream
                                     payloads to the host, then report (and keep holding)
  {"op": "hold", "k": k, "send_back": false}   the same without sending anything back

Exits 0 when the host says goodbye."""

import json
import struct
import sys
import time

import numpy as np

import mmap_content as mc
from shmhub import HostGone, connect

SEQ = struct.Struct("<Q")


def main() -> int:
    link = connect()
    n = seed = None
    base = expect_mid = None
    seq_in = seq_out = 0
    got = got_bytes = 0
    errors = []
    held = []
    hold_left = 0
    send_back = True

    def check(msg) -> None:
        nonlocal seq_in, got, got_bytes
        try:
            if msg.tier != "mmap" or len(msg) != n:
                raise ValueError(f"message {seq_in}: tier {msg.tier}, {len(msg)} bytes (expected mmap, {n})")
            mv = memoryview(msg)
            try:
                head, tail = SEQ.unpack(mv[:8])[0], SEQ.unpack(mv[-8:])[0]
                if head != seq_in or tail != seq_in:
                    raise ValueError(f"message {seq_in}: sequence head {head} tail {tail}")
                if not np.array_equal(np.frombuffer(mv, np.uint64)[1:-1], expect_mid):
                    raise ValueError(f"message {seq_in}: content differs")
            finally:
                mv.release()
        except ValueError as e:
            if len(errors) < 10:
                errors.append(str(e))
        seq_in += 1
        got += 1
        got_bytes += len(msg)

    try:
        while True:
            msg = link.recv(timeout=120)
            if msg.tier == "inline":
                cmd = json.loads(bytes(msg))
                msg.release()
            else:
                check(msg)
                if hold_left:
                    held.append(msg)
                    hold_left -= 1
                    if hold_left:
                        continue
                    for _ in range(len(held) if send_back else 0):  # the host is holding these, too
                        link.send(_stamp(base, seq_out), timeout=30)
                        seq_out += 1
                    report = {"holding": len(held), "mappings": link.mappings, "errors": errors}
                    link.send(json.dumps(report).encode(), timeout=30)
                else:
                    msg.release()
                del msg
                continue
            op = cmd["op"]
            if op == "sink":
                n, seed = cmd["n"], cmd["seed"]
                base = mc.content(seed, n)
                expect_mid = np.frombuffer(base, np.uint64)[1:-1].copy()
                report = {"ok": True}
            elif op == "stat":
                report = {
                    "got": got,
                    "got_bytes": got_bytes,
                    "errors": errors,
                    "rss_kib": mc.rss_kib(),
                    "fds": mc.fd_count(),
                    "mappings": link.mappings,
                    "map_inodes": len(mc.map_inodes()),
                    "stats": link.stats.as_dict(),
                }
            elif op == "source":
                t0 = time.monotonic()
                sent = 0
                while time.monotonic() - t0 < cmd["seconds"]:
                    link.send(_stamp(base, seq_out), timeout=30)
                    seq_out += 1
                    sent += 1
                report = {"sent": sent, "seconds": time.monotonic() - t0, "mappings": link.mappings}
            elif op == "hold":
                hold_left = cmd["k"]
                send_back = cmd.get("send_back", True)
                continue
            else:
                raise SystemExit(f"unknown op {op!r}")
            link.send(json.dumps(report).encode(), timeout=30)
    except HostGone:
        return 0
    finally:
        held.clear()
        link.close()


def _stamp(buf: bytearray, seq: int) -> bytearray:
    SEQ.pack_into(buf, 0, seq)
    SEQ.pack_into(buf, len(buf) - 8, seq)
    return buf


if __name__ == "__main__":
    sys.exit(main())
