"""The README's rpc example runs as written and prints what its comments say."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_readme_rpc_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("# rpc_host.py")
    block = text[start:text.index("```", start)]
    host, guest = block.split("# rpc_guest.py")
    (tmp_path / "rpc_host.py").write_text(host)
    (tmp_path / "rpc_guest.py").write_text(guest)
    out = subprocess.run([sys.executable, "rpc_host.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["3", "9900", "[0, 1, 2, 3, 4]", "[2. 2. 2.] False", "remote: division by zero"]
