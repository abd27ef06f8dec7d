"""Every interleaving of the lock-free core, checked with the SPIN model checker.

The models (*.pml beside this file) follow _native.pyx step by step, one atomic step per access
to a shared word; each names its forbidden outcomes as asserts (or as SPIN's invalid end state
for a lost wakeup). The quick run here checks each model at its smallest size, and that each
injected bug is found (a checker that finds nothing proves nothing). `make interleave` runs
the larger sizes: python tests/interleave/test_interleave.py --full. docs/hardening.md has the
counts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# (model, defines): must verify clean, at the smallest sizes (the quick run) ...
QUICK: List[Tuple[str, Tuple[str, ...]]] = [
    ("ring.pml", ()),
    ("ring.pml", ("KILL",)),
    ("pool.pml", ()),
    ("pool.pml", ("DOUBLE",)),
    ("waiters.pml", ()),
    ("waiters.pml", ("K=2", "N=4")),
    ("waiters.pml", ("FILENO",)),
    ("waiters.pml", ("FILENO", "K=2", "N=4")),
    ("pool_waiters.pml", ()),
    ("pool_waiters.pml", ("RETURN", "FREES=1")),
]
# ... and at larger ones (make interleave).
FULL: List[Tuple[str, Tuple[str, ...]]] = QUICK + [
    ("ring.pml", ("CAP=8", "NFRAMES=6", "MAXF=4")),
    ("ring.pml", ("CAP=12", "NFRAMES=8", "MAXF=4")),
    ("ring.pml", ("KILL", "CAP=8", "NFRAMES=6", "MAXF=4")),
    ("pool.pml", ("NSLOTS=3", "ROUNDS1=2", "ROUNDS2=1")),
    ("pool.pml", ("NSLOTS=2", "ROUNDS1=2", "ROUNDS2=2")),
    ("waiters.pml", ("K=2", "N=6")),
    ("waiters.pml", ("K=3", "N=10")),
    ("waiters.pml", ("K=3", "N=10", "B=3")),
    ("waiters.pml", ("FILENO", "K=3", "N=10")),
    ("pool_waiters.pml", ("FREES=3",)),
    ("pool_waiters.pml", ("RETURN", "FREES=2")),
]
# Injected bugs: each must make SPIN report an error.
BUGS: List[Tuple[str, Tuple[str, ...]]] = [
    ("ring.pml", ("BUG_NO_MIDWRAP",)),
    ("ring.pml", ("BUG_WRITE_FIRST",)),
    ("ring.pml", ("BUG_WM_FIRST",)),
    ("ring.pml", ("BUG_NONSTRICT",)),
    ("ring.pml", ("KILL", "BUG_NO_LAST_LOOK")),
    ("pool.pml", ("BUG_NO_TAG",)),
    ("pool.pml", ("BUG_NO_JOURNAL",)),
    ("pool.pml", ("BUG_NO_OTHER",)),
    ("pool.pml", ("BUG_POP_ONLY",)),
    ("pool.pml", ("BUG_ONE_CHECK",)),
    ("pool.pml", ("DOUBLE", "BUG_FREE_STORE")),
    ("waiters.pml", ("BUG_NO_RECHECK",)),
    ("waiters.pml", ("BUG_LOOK_FIRST",)),
    ("waiters.pml", ("BUG_ANNOUNCE_ONCE",)),
    ("waiters.pml", ("BUG_DRAIN_FIRST",)),
    ("waiters.pml", ("K=2", "N=4", "B=3", "BUG_BATCH_ONLY")),
    ("waiters.pml", ("FILENO", "BUG_REARM_LATE_DRAIN")),
    ("pool_waiters.pml", ("BUG_NO_RETRY",)),
    ("pool_waiters.pml", ("BUG_NO_REARM",)),
    ("pool_waiters.pml", ("BUG_NO_BATON",)),
    ("pool_waiters.pml", ("BUG_PLAIN_WAIT",)),
]

MAX_DEPTH = 100_000


@dataclass
class Result:
    model: str
    defines: Tuple[str, ...]
    errors: int
    states: int
    transitions: int
    depth: int
    seconds: float
    output: str

    @property
    def label(self) -> str:
        return " ".join([self.model, *(f"-D{d}" for d in self.defines)])


def tools_present() -> bool:
    return shutil.which("spin") is not None and shutil.which("cc") is not None


def verify(model: str, defines: Sequence[str] = (), optimise: bool = True) -> Result:
    """spin -a, cc, ./pan: an exhaustive safety search (assertions and invalid end states)."""
    with tempfile.TemporaryDirectory(prefix="shmhub-spin-") as tmp:
        shutil.copy(os.path.join(HERE, model), tmp)
        flags = [f"-D{d}" for d in defines]
        run = lambda *cmd: subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600)  # noqa: E731
        gen = run("spin", "-a", *flags, model)
        assert gen.returncode == 0, f"spin -a {model}: {gen.stdout}{gen.stderr}"
        # -DSAFETY: no cycle search (safety only); the state hash table grows to 2^22 slots.
        cc = run("cc", "-O1" if optimise else "-O0", "-w", "-DSAFETY", "-o", "pan", "pan.c")
        assert cc.returncode == 0, f"cc pan.c ({model}): {cc.stderr[-2000:]}"
        t0 = time.monotonic()
        pan = run("./pan", f"-m{MAX_DEPTH}", "-w22")
        seconds = time.monotonic() - t0
    out = pan.stdout + pan.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, out)) else -1  # noqa: E731
    return Result(
        model, tuple(defines), num(r"errors: (\d+)"), num(r"(\d+) states, stored"), num(r"(\d+) transitions"), num(r"depth reached (\d+)"), seconds, out
    )


def assert_clean(r: Result) -> None:
    assert r.errors == 0, f"{r.label}: SPIN found a violation:\n{r.output}"
    assert r.states > 0 and "max search depth too small" not in r.output, f"{r.label}: search incomplete:\n{r.output}"
    assert 0 < r.depth < MAX_DEPTH, r.output


def assert_found(r: Result) -> None:
    assert r.errors > 0, f"{r.label}: the injected bug went unnoticed:\n{r.output}"


needs_spin = pytest.mark.skipif(not tools_present(), reason="SPIN (apt-get install spin) or a C compiler is absent")


@needs_spin
@pytest.mark.parametrize("model,defines", QUICK, ids=[" ".join([m, *d]) for m, d in QUICK])
def test_model_holds(model, defines):
    assert_clean(verify(model, defines))


@needs_spin
def test_injected_bugs_are_found():
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda md: verify(md[0], md[1], optimise=False), BUGS))
    for r in results:
        assert_found(r)


def main(argv: List[str]) -> int:
    """make interleave: every model at every size, and every injected bug; a table of counts."""
    if not tools_present():
        print("SPIN or a C compiler is absent (apt-get install spin gcc)", file=sys.stderr)
        return 2
    runs = FULL if "--full" in argv else QUICK
    failed = 0
    print(f"{'model':<48} {'states':>12} {'transitions':>12} {'depth':>6} {'s':>7}  result")
    for model, defines in runs:
        r = verify(model, defines)
        ok = r.errors == 0 and "max search depth too small" not in r.output and r.states > 0
        failed += not ok
        print(f"{r.label:<48} {r.states:>12} {r.transitions:>12} {r.depth:>6} {r.seconds:>7.2f}  {'ok' if ok else 'VIOLATION'}")
        if not ok:
            print(r.output)
    print()
    for model, defines in BUGS:
        r = verify(model, defines, optimise=False)
        found = r.errors > 0
        failed += not found
        first = next((ln for ln in r.output.splitlines() if ln.startswith("pan:1:")), "")
        print(f"{r.label:<48} {'found' if found else 'MISSED'}: {first}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
