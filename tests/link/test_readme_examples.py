"""The README's examples run as written and print what their comments say."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_example(tmp_path, first: str, second: str) -> list:
    """Write the README code block that starts with `# first` and contains `# second` as two files,
    run the first with Python in tmp_path; its stdout lines."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"# {first}")
    a, b = text[start:text.index("```", start)].split(f"# {second}")
    (tmp_path / first).write_text(a)
    (tmp_path / second).write_text(b)
    out = subprocess.run([sys.executable, first], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def test_readme_first_example_runs(tmp_path):
    assert run_example(tmp_path, "host.py", "worker.py") == ["b'hello'", "1 b'world'"]


def test_readme_rpc_example_runs(tmp_path):
    assert run_example(tmp_path, "rpc_host.py", "rpc_guest.py") == [
        "3", "9900", "[0, 1, 2, 3, 4]", "[2. 2. 2.] False", "remote: division by zero"]
