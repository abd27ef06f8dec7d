"""Task functions for the remote executor tests (importable by local and remote workers)."""

from __future__ import annotations

import os
import time

REMOTE = "SHMHUB_TEST_REMOTE_WORKER"  # set in the environment of the remote workers the tests start


def where(x=None):
    return ("remote" if os.environ.get(REMOTE) else "local", os.getpid(), x)


def hold(local_seconds, remote_seconds):
    """Sleep; longer on a remote worker (so a test can kill it mid-task)."""
    time.sleep(remote_seconds if os.environ.get(REMOTE) else local_seconds)
    return where()


def total(a):
    return float(a.sum())
