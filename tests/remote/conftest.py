"""Remote links over TCP on 127.0.0.1 (random free ports): a listener, and guests in threads or
processes (guests/*.py)."""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import subprocess
import sys
import threading
from typing import Iterator, List, Tuple

import pytest

pytest.importorskip("zmq")

from zmq.utils.garbage import gc as zmq_gc  # noqa: E402

from shmhub.remote import Listener, RemoteGuest, RemoteLink, connect  # noqa: E402

# Local workers of Executor start through multiprocessing's forkserver, which (with its resource
# tracker) lives as long as the test process: start both now, as tests/executor/conftest.py does.
multiprocessing.get_context("forkserver").set_forkserver_preload(["shmhub.executor._worker", "numpy"])
multiprocessing.resource_tracker.ensure_running()
multiprocessing.forkserver.ensure_running()

# pyzmq frees zero-copy frames through one thread and context of its own, started on the first
# large send and kept for the life of the process: start it now, so no_leaks counts it as baseline.
zmq_gc.start()
zmq_gc._push_socket  # noqa: B018  (its one PUSH socket, created on first use)

HERE = os.path.dirname(os.path.abspath(__file__))
GUESTS = os.path.join(HERE, "guests")
T = 20  # upper bound of every wait here; none should come close
LIVENESS = 0.6  # short heartbeats, so peer-death tests are quick


@pytest.fixture
def listener() -> Iterator[Listener]:
    lis = Listener("tcp://127.0.0.1:0", liveness=LIVENESS)
    yield lis
    lis.close()


def pair_on(lis: Listener, **kw) -> Tuple[RemoteGuest, RemoteLink]:
    """(host's guest, guest's link), both in this process."""
    out: List[RemoteLink] = []
    t = threading.Thread(target=lambda: out.append(connect(lis.endpoint, timeout=T, name="t", liveness=LIVENESS, **kw)))
    t.start()
    g = lis.accept(timeout=T)
    t.join(T)
    return g, out[0]


@pytest.fixture
def pair(listener) -> Iterator[Tuple[RemoteLink, RemoteLink]]:
    """(host end, guest end) of one remote link."""
    g, link = pair_on(listener)
    yield g.link, link
    link.close()
    g.link.close()


def start_guest(script: str, *args: object) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, os.path.join(GUESTS, script), *map(str, args)])


def stop(proc: "subprocess.Popen[bytes]") -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(T)
