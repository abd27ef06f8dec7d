"""Helpers of the remote tests: guests in threads or processes (guests/*.py), on random free ports."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import List, Tuple

from shmhub.remote import Listener, RemoteGuest, RemoteLink, connect

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(HERE, "guests")
T = 20  # upper bound of every wait here; none should come close
LIVENESS = 0.6  # short heartbeats, so peer-death tests are quick


def pair_on(lis: Listener, **kw) -> Tuple[RemoteGuest, RemoteLink]:
    """(host's guest, guest's link), both in this process."""
    out: List[RemoteLink] = []
    t = threading.Thread(target=lambda: out.append(connect(lis.endpoint, timeout=T, name="t", liveness=LIVENESS, **kw)))
    t.start()
    g = lis.accept(timeout=T)
    t.join(T)
    return g, out[0]


def start_guest(script: str, *args: object) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, os.path.join(GUESTS, script), *map(str, args)])


def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(T)
