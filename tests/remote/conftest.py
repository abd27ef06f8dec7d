"""Remote links over TCP on 127.0.0.1 (random free ports): fixtures; helpers in remoteutil.py."""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import sys
from typing import Iterator, Tuple

import pytest

pytest.importorskip("zmq")

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from zmq.utils.garbage import gc as zmq_gc  # noqa: E402

from remoteutil import LIVENESS, pair_on  # noqa: E402
from shmhub.remote import Listener, RemoteLink  # noqa: E402

# Local workers of Executor start through multiprocessing's forkserver, which (with its resource
# tracker) lives as long as the test process: start both now, as tests/executor/conftest.py does.
multiprocessing.get_context("forkserver").set_forkserver_preload(["shmhub.executor._worker", "numpy"])
multiprocessing.resource_tracker.ensure_running()
multiprocessing.forkserver.ensure_running()

# pyzmq frees zero-copy frames through one thread and context of its own, started on the first
# large send and kept for the life of the process: start it now, so no_leaks counts it as baseline.
zmq_gc.start()
zmq_gc._push_socket  # noqa: B018  (its one PUSH socket, created on first use)


@pytest.fixture
def listener() -> Iterator[Listener]:
    lis = Listener("tcp://127.0.0.1:0", liveness=LIVENESS)
    yield lis
    lis.close()


@pytest.fixture
def pair(listener) -> Iterator[Tuple[RemoteLink, RemoteLink]]:
    """(host end, guest end) of one remote link."""
    g, link = pair_on(listener)
    yield g.link, link
    link.close()
    g.link.close()
