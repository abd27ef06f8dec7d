"""The typed public API (the Makefile's TYPED list, also checked by `make lint`) stays mypy
--strict clean; skipped where mypy is not installed (it comes with the lint extra)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def typed_paths() -> list:
    with open(os.path.join(ROOT, "Makefile")) as f:
        m = re.search(r"^TYPED := (.*?)(?<!\\)\n", f.read(), re.M | re.S)
    assert m, "the Makefile has no TYPED list"
    return m.group(1).replace("\\\n", " ").split()


def test_the_typed_api_is_strictly_typed():
    pytest.importorskip("mypy")
    paths = typed_paths()
    assert {"src/shmhub/rpc", "src/shmhub/http", "src/shmhub/executor"} <= set(paths)
    # The settings (strict, the cache) are pyproject's, as for `make lint`: a second run hits its cache.
    out = subprocess.run([sys.executable, "-m", "mypy", *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
