"""Guests of tests/stress/test_faults.py. argv: MODE OUT [SOCKET]; each writes a JSON report to OUT
(atomically: OUT.tmp then rename) and exits 0, or exits 3 on anything unexpected.

  mmap-rx      spawned: receive 3 small messages, then, with no fd left (RLIMIT_NOFILE), a large
               one whose mapping fd the kernel drops; report the error of that recv
  bootstrap    walk-in: connect(SOCKET) with one fd left (the socket's): the 4 fds are dropped;
               report the error, lift the limit, connect again and echo one message
  connect      walk-in: connect(SOCKET, timeout=2) once (with a 4th argument, once a line arrives
               on stdin); report the outcome; if connected, echo one message
  stop         walk-in with heartbeats: echo until the link fails (the test SIGSTOPs, the host
               recovers us, the test SIGCONTs); report recv's error and a later send's error
  echo         walk-in: echo until the host says goodbye (a bystander guest)
  blocked      spawned: fill the guest-to-host ring (the host never reads it), mark OUT.blocked,
               then block in send() until the host dies; report the error and when it came
  loop         spawned: send numbered messages in a tight loop (mark OUT.running after 1000)
               until the host dies; report as blocked
"""

import json
import os
import resource
import struct
import sys
import time

from common import leave_free

import shmhub
from shmhub.errors import HostGone, PeerDead, ShmhubError

TIMEOUT = 30.0


def report(out: str, **info) -> None:
    with open(out + ".tmp", "w") as f:
        json.dump(info, f)
    os.rename(out + ".tmp", out)


def error(e: BaseException) -> dict:
    return {"error": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}


def echo_once(link) -> None:
    data = link.recv_bytes(timeout=TIMEOUT)
    link.send(data, timeout=TIMEOUT)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    sock = sys.argv[3] if len(sys.argv) > 3 else None
    if mode == "mmap-rx":
        link = shmhub.connect()
        try:  # nothing comes yet: this recv sleeps, so the waiter's eventfd exists before the limit
            link.recv_bytes(timeout=0.2)
            raise SystemExit("mmap-rx: a message before the host was told to send")
        except shmhub.ShmTimeout:
            pass
        link.send(b"armed", timeout=TIMEOUT)
        got = [link.recv_bytes(timeout=TIMEOUT) for _ in range(3)]
        old = leave_free(0)
        link.send(b"ready", timeout=TIMEOUT)
        try:
            link.recv_bytes(timeout=TIMEOUT)
            res = {"error": None}
        except ShmhubError as e:
            res = error(e)
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        res["received_before"] = [len(g) for g in got]
        link.close()
        report(out, **res)
    elif mode == "bootstrap":
        old = leave_free(1)
        try:
            shmhub.connect(sock, timeout=TIMEOUT).close()
            first = {"error": None}
        except ShmhubError as e:
            first = error(e)
        resource.setrlimit(resource.RLIMIT_NOFILE, old)
        first["fds_after"] = len(os.listdir("/proc/self/fd"))
        link = shmhub.connect(sock, timeout=TIMEOUT)
        echo_once(link)
        link.close()
        report(out, first=first, fds_before=first["fds_after"], fds_end=len(os.listdir("/proc/self/fd")))
    elif mode == "connect":
        if len(sys.argv) > 4:  # --wait: connect once a line arrives on stdin
            sys.stdin.readline()
        try:
            link = shmhub.connect(sock, timeout=2.0)
        except ShmhubError as e:
            report(out, **error(e))
            return
        echo_once(link)
        link.close()
        report(out, error=None)
    elif mode == "stop":
        link = shmhub.connect(sock, timeout=TIMEOUT)
        link.send(b"ready", timeout=TIMEOUT)
        res = {"peer_id": link.peer_id, "echoed": 0}
        try:
            while True:
                echo_once(link)
                res["echoed"] += 1
        except ShmhubError as e:
            res["recv"] = error(e)
        try:
            link.send(b"zombie", timeout=1.0)
            res["send"] = {"error": None}
        except ShmhubError as e:
            res["send"] = error(e)
        link.close()
        report(out, **res)
    elif mode == "echo":
        link = shmhub.connect(sock, timeout=TIMEOUT)
        try:
            while True:
                echo_once(link)
        except HostGone:
            pass
        link.close()
    elif mode in ("blocked", "loop"):
        link = shmhub.connect()
        sent = 0
        try:
            if mode == "blocked":
                while link.try_send(struct.pack("<I", sent) * 16):
                    sent += 1
                open(out + ".blocked", "w").close()
            while True:
                link.send(struct.pack("<I", sent) * 16, timeout=TIMEOUT)
                sent += 1
                if sent == 1000 and mode == "loop":
                    open(out + ".running", "w").close()
        except (HostGone, PeerDead) as e:
            report(out, noticed_ns=time.monotonic_ns(), sent=sent, **error(e))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
