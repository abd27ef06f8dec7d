"""Guest for the cross-process control-channel fault tests of tests/link/test_mmap.py.

mmap_fault.py victim    report our fd count, then receive: the host has put a malformed attach
                        datagram (two fds) before a real one. Expect LinkCorrupted; print a JSON
                        result line on stdout and exit 0.
mmap_fault.py attacker  on {"op": "attack"}: put an attach datagram whose mapping has a bad magic
                        on our control socket, then send a real 2 MiB payload (its attach follows
                        the bad one). Wait for the host to go."""

import array
import json
import os
import socket
import struct
import sys
import time

import mmap_content as mc
from shmhub import HostGone, LinkCorrupted, connect


def main() -> int:
    mode = sys.argv[1]
    link = connect()
    try:
        if mode == "victim":
            before = mc.fd_count()
            link.send(json.dumps({"fds": before}).encode(), timeout=10)
            out = {"fds_before": before, "corrupted": False}
            t0 = time.monotonic()
            try:
                msg = link.recv(timeout=10)
                out["got"] = [msg.tier, len(msg)]
                msg.release()
            except LinkCorrupted as e:
                out.update(corrupted=True, error=str(e), seconds=time.monotonic() - t0)
            out["fds_after"] = mc.fd_count()
            out["maps_after"] = len(mc.map_inodes(name="memfd:shmhub-evil"))
            try:
                link.send(b"x", timeout=1)
                out["send_after"] = "sent"
            except LinkCorrupted:
                out["send_after"] = "LinkCorrupted"
            print(json.dumps(out), flush=True)
            return 0
        if mode == "attacker":
            with link.recv(timeout=30) as m:
                assert json.loads(bytes(m)) == {"op": "attack"}
            fd = os.memfd_create("shmhub-evil", os.MFD_CLOEXEC)
            os.ftruncate(fd, 1 << 20)
            os.pwrite(fd, b"BADMAGIC" + struct.pack("<II", 1, 1), 0)
            body = struct.pack("<IIQ", 1000, 1, 1 << 20)
            link._control.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            os.close(fd)
            link.send(bytes(2 << 20), timeout=10)
            while True:
                link.recv(timeout=60).release()
        raise SystemExit(f"unknown mode {mode!r}")
    except HostGone:
        return 0
    finally:
        link.close()


if __name__ == "__main__":
    sys.exit(main())
