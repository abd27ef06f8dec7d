"""Resource limits hit at segment creation and growth, in a process of its own (rlimits are
per process). argv: MODE; prints one JSON report on stdout.

  create-as    RLIMIT_AS leaves 8 MiB of address space; create a 64 MiB segment: the mapping fails
  grow-fsize   RLIMIT_FSIZE at the file's size (SIGXFSZ ignored); grow a class: fallocate fails
  grow-as      RLIMIT_AS leaves 16 KiB; grow a class: fallocate succeeds, mapping the extent fails

The report gives the error's type and errno, the fds and segment sizes before and after, and,
for growth, whether the old pool still works and whether growth succeeds once the limit is lifted."""

import json
import os
import resource
import signal
import sys

from shmhub import Segment, SegmentConfig
from shmhub.errors import ShmhubError

GROWABLE = SegmentConfig(max_guests=1, bipbuf_capacity=4096, size_classes=((4096, 16, 4),))
BIG = SegmentConfig(max_guests=1, bipbuf_capacity=4096, size_classes=((1 << 20, 64),))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def error(e: BaseException) -> dict:
    return {"error": type(e).__name__, "errno": getattr(e, "errno", None), "shmhub": isinstance(e, ShmhubError), "message": str(e)}


def attempt(fn) -> dict:
    try:
        fn()
    except BaseException as e:  # reported, judged by the test
        return error(e)
    return {"error": None}


def main() -> None:
    mode = sys.argv[1]
    out: dict = {"mode": mode}
    if mode == "create-as":
        before = fds()
        limit = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (8 << 20), limit[1]))
        try:
            out.update(attempt(lambda: Segment.create(BIG)))
        finally:
            resource.setrlimit(resource.RLIMIT_AS, limit)
        out["fds_leaked"] = fds() - before
    else:
        seg = Segment.create(GROWABLE)
        size0, cur0, before = seg.file_size, seg.current_size, fds()
        if mode == "grow-fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us before EFBIG
            res, lim = resource.RLIMIT_FSIZE, size0
        else:
            res, lim = resource.RLIMIT_AS, vm_size() + (16 << 10)
        limit = resource.getrlimit(res)
        resource.setrlimit(res, (lim, limit[1]))
        try:
            out.update(attempt(lambda: seg.grow_class(0)))
        finally:
            resource.setrlimit(res, limit)
        out["fds_leaked"] = fds() - before
        out["file_size_unchanged"] = seg.file_size == size0
        out["current_size_unchanged"] = seg.current_size == cur0
        out["extents_after_failure"] = seg.extent_count(0)
        refs = [seg.alloc(100, 1) for _ in range(16)]  # the whole existing class is still usable
        out["old_pool_usable"] = all(r is not None for r in refs) and seg.alloc(100, 1) is None
        for c, e, s, gen in refs:  # type: ignore[misc]
            seg.pool.free_if_current(c, e, s, gen, 1)
        out["grown_after_lift"] = seg.grow_class(0)
        out["extents_after_lift"] = seg.extent_count(0)
        seg.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
