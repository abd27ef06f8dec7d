"""Every test leaves nothing behind: no /dev/shm file, no child process, no open fd."""

from __future__ import annotations

import gc
import os
import re
import time

import pytest

HERE = os.path.dirname(__file__)
VECTORS = os.path.join(HERE, "conformance", "vox-v7")


def _fds() -> set:
    return set(os.listdir("/proc/self/fd"))


def _children() -> set:
    out = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                out.update(f.read().split())
        except FileNotFoundError:
            pass
    return out


SESSION_TAG = f"shmhub-test-{os.getpid()}-"
_OTHER_SESSION = re.compile(r"shmhub-test-(\d+)-")


def _shm() -> set:
    """/dev/shm entries, less those of other test sessions and of iceoryx2 (a benchmark baseline
    that shmhub never uses, from benchmark runs sharing the machine) appearing at the same time."""
    return {n for n in os.listdir("/dev/shm") if not n.startswith("iox2_") and not ((m := _OTHER_SESSION.match(n)) and m.group(1) != str(os.getpid()))}


@pytest.fixture(autouse=True)
def no_leaks():
    fds, kids, shm = _fds(), _children(), _shm()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while True:
        new_kids = _children() - kids
        if not new_kids or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    new_fds = {fd for fd in _fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    leaked = {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in new_fds if os.path.lexists(f"/proc/self/fd/{fd}")}
    assert not new_kids, f"test left child processes {sorted(new_kids)}"
    assert not leaked, f"test leaked fds {leaked}"
    assert not (_shm() - shm), f"test left files in /dev/shm: {sorted(_shm() - shm)}"


@pytest.fixture
def vectors():
    return VECTORS


@pytest.fixture
def shm_path(tmp_path_factory):
    """A fresh path in /dev/shm, removed afterwards if the test left it."""
    import uuid

    path = f"/dev/shm/{SESSION_TAG}{uuid.uuid4().hex}"
    yield path
    if os.path.exists(path):
        os.unlink(path)
        pytest.fail(f"test left {path} behind")
