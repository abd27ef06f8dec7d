"""Coverage-guided fuzzing of one target of fuzz_targets.py under atheris (libFuzzer).

    python tests/fuzz/fuzz_run.py TARGET [libFuzzer options] [WORK_CORPUS_DIR] [SEED_DIRS...]

The shmhub modules are instrumented for Python coverage (atheris.instrument_imports); the
compiled core is not (its branches are reached through the Python that calls it). A target that
raises anything but a ShmhubError is a crash: libFuzzer writes the input to -artifact_prefix.
`make fuzz` runs every target; `--list` prints their names. The target `any` is all of them in
one (the input's first byte picks one): the test suite's smoke run uses it, one process for all.
"""

from __future__ import annotations

import os
import re
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

with atheris.instrument_imports(include=["shmhub", "fuzz_targets"]):
    import shmhub.bigmap  # noqa: F401
    import shmhub.bootstrap  # noqa: F401
    import shmhub.executor._shared  # noqa: F401
    import shmhub.guest  # noqa: F401
    import shmhub.http._meta  # noqa: F401
    import shmhub.link  # noqa: F401
    import shmhub.rpc._protocol  # noqa: F401
    import shmhub.rpc._wire  # noqa: F401
    import shmhub.segment  # noqa: F401

    import fuzz_targets

_BUCKETS = 512


def _feedback_fn():  # type: ignore[no-untyped-def]
    """A function with one branch per bucket, instrumented: which check of the (uninstrumented)
    compiled core refused an input becomes a coverage edge, so libFuzzer keeps inputs that get
    past one more check. The bucket is a hash of the error's type and message, digits removed."""
    body = "\n".join(f"    {'if' if i == 0 else 'elif'} h == {i}:\n        return {i}" for i in range(_BUCKETS))
    ns: dict = {}
    exec(f"def bucket(h):\n{body}\n    return -1\n", ns)
    return atheris.instrument_func(ns["bucket"])


_bucket = _feedback_fn()
_DIGITS = re.compile(r"[0-9]+")


def feedback(e: BaseException) -> None:
    _bucket(hash(type(e).__name__ + _DIGITS.sub("", str(e))) % _BUCKETS)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] == "--list":
        print("\n".join(fuzz_targets.TARGETS))
        return
    name = sys.argv.pop(1)
    if name not in fuzz_targets.TARGETS and name != "any":
        sys.exit(f"unknown target {name!r}; targets: {', '.join(fuzz_targets.TARGETS)}")
    if name in ("segment", "bootstrap_msgs", "any"):
        fuzz_targets.segment_template()  # built once, before the fuzzer starts counting
    run_one = fuzz_targets.run_one

    def one(data: bytes) -> None:
        run_one(name, data, feedback)

    # libFuzzer's -merge=1 and -fork re-run argv[0] through the shell: make it run this target.
    sys.argv[0] = f"{sys.executable} {os.path.abspath(__file__)} {name}"
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
