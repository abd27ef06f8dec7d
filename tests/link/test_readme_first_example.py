"""The README's first example (host.py + worker.py) runs as written and prints what its comments say."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_first_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("# host.py")
    block = text[start:text.index("```", start)]
    host, worker = block.split("# worker.py")
    (tmp_path / "host.py").write_text(host)
    (tmp_path / "worker.py").write_text(worker)
    out = subprocess.run([sys.executable, "host.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["b'hello'", "1 b'world'"]
