"""The many-guest benchmark scenarios (benchmarks/scale.py) stay runnable: a --quick run at G = 2
writes its table and JSON, and every message of every scenario was verified."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.mark.timeout(180)
def test_many_guest_benchmark_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", "fanin", "fanout", "reqresp", "spawn", "--guests", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "latest.json").read_text())["scale"]
    for scenario in ("fanin", "fanout", "reqresp"):
        for transport, rows in res[scenario].items():
            r = rows["2"]
            assert "error" not in r, (scenario, transport, r)
            assert r["errors"] == 0 and r["msgs"] > 0, (scenario, transport, r)
    assert res["spawn"]["guests"] == 2 and res["spawn"]["ratio"] > 0
    md = (tmp_path / "latest.md").read_text()
    assert "### Many guests, one host (issue 12)" in md and "### Targets (issue 12)" in md
