"""The fuzz targets in the test suite: the committed corpus replayed in-process (every input parses
or raises a ShmhubError, and leaks nothing: conftest checks fds and /dev/shm), then seeded
random mutations of it in-process, then one short coverage-guided atheris run over all targets
(`make fuzz` runs the long ones, one process per target)."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import fuzz_targets

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")
SMOKE_RUNS = int(os.environ.get("FUZZ_SMOKE_RUNS", "2500"))


def _inputs(name: str) -> list:
    d = os.path.join(CORPUS, name)
    return [os.path.join(d, f) for f in sorted(os.listdir(d))]


@pytest.fixture(scope="module", autouse=True)
def _scratch():
    yield
    fuzz_targets.close_scratch()


@pytest.mark.parametrize("name", sorted(fuzz_targets.TARGETS))
def test_corpus_replays(name):
    files = _inputs(name)
    assert files, f"no corpus for {name}"
    fuzz_targets.segment_template()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        try:
            fuzz_targets.run_one(name, data)
        except Exception as e:
            raise AssertionError(f"{name}: {os.path.relpath(path, HERE)} raised {type(e).__name__}: {e}") from e
    fuzz_targets.close_scratch()


def test_corpus_is_small():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
    assert total < 2 * 1024 * 1024, f"the committed corpus is {total} bytes"


def _mutate(rng: random.Random, data: bytes, pool: list) -> bytes:
    """One of libFuzzer's simpler mutations: flip, set to an edge value, insert, erase, splice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:
            b[i % len(b)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[i % len(b)] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
        elif op == 2:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and b:
            del b[i : i + rng.randint(1, 8)]
        elif op == 4:
            other = rng.choice(pool)
            j = rng.randrange(len(other) + 1)
            b[i:] = other[j:]
        elif b:
            j = i % len(b)
            b[j : j + 4] = rng.choice((0, 0xFFFFFFFF, 0x7FFFFFFF, 8, 4096)).to_bytes(4, "little")
    return bytes(b)


@pytest.mark.parametrize("name", sorted(fuzz_targets.TARGETS))
def test_mutated_corpus(name):
    """SMOKE_RUNS seeded random mutations of the corpus, in-process (no fuzzer needed)."""
    pool = []
    for path in _inputs(name):
        with open(path, "rb") as f:
            pool.append(f.read())
    rng = random.Random(f"shmhub-fuzz-{name}")
    fuzz_targets.segment_template()
    for i in range(SMOKE_RUNS):
        data = _mutate(rng, rng.choice(pool), pool)
        try:
            fuzz_targets.run_one(name, data)
        except Exception as e:
            raise AssertionError(f"{name}: mutated input #{i} {data!r} raised {type(e).__name__}: {e}") from e
    fuzz_targets.close_scratch()


def test_atheris_smoke(tmp_path):
    """One coverage-guided atheris run over every target at once (target `any`: the first byte
    picks the target), from the committed corpus: the fuzzer's wiring works and finds nothing."""
    pytest.importorskip("atheris", reason="atheris (the `test` extra) runs the coverage-guided smoke run")
    names = sorted(fuzz_targets.TARGETS)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for k, name in enumerate(names):
        for path in _inputs(name):
            with open(path, "rb") as f:
                (seeds / f"{name}-{os.path.basename(path)}").write_bytes(bytes([k]) + f.read())
    work = tmp_path / "new"
    work.mkdir()
    runs = SMOKE_RUNS * len(names)
    cmd = [
        sys.executable,
        os.path.join(HERE, "fuzz_run.py"),
        "any",
        f"-runs={runs}",
        "-seed=1",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
        str(work),
        str(seeds),
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    tail = "\n".join(p.stderr.splitlines()[-40:])
    assert p.returncode == 0, f"the fuzzer found a failing input (artifacts in {tmp_path}):\n{tail}"
    assert f"Done {runs} runs" in p.stderr, tail
