"""The kill-anywhere tests' host. The executor's spawned workers start multiprocessing's resource
tracker, which lives as long as the test process: it is started before the first test, so
no_leaks counts it as baseline."""

import multiprocessing.resource_tracker

import pytest
from killutil import CONFIG

from shmhub import Host

multiprocessing.resource_tracker.ensure_running()


@pytest.fixture
def host(tmp_path):
    """A host of killutil.CONFIG, listening for walk-in guests: (host, socket path)."""
    with Host(CONFIG) as h:
        sock = str(tmp_path / "hub.sock")
        h.listen(sock)
        yield h, sock
