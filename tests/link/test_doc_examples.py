"""Every code block of README.md and docs/**/*.md runs, and the README's examples print what their
comments say.

Rules for the documentation (a block that breaks them fails here):

* Code blocks are fenced with ``` in column 0 (indented and ~~~ fences are refused).
* A fenced block tagged `python` runs with this interpreter; one tagged `sh` runs with
  `bash -euo pipefail`, this interpreter's bin directory first on PATH (so `shmhub` and `python`
  are this package's). Each runs in a fresh directory per document, and must exit 0 within 60 s.
* A block that is not meant to run is marked: the language `text` (output, diagrams), or the line
  `<!-- not run: reason -->` right above the fence. A fence with no language fails.
* Multi-file examples: a python block whose first line is `# NAME.py` is a file, and so is each
  further column-0 `# NAME.py` line in it (the README puts host.py and worker.py in one block). The
  named files of one document are all written before any runs; a file whose name another file of
  the document quotes (`"worker.py"`) is started by that file; every other one is run.
* A sentence of the document that starts with "It prints" names output: each backticked string in
  it must be a whole line of what the document's examples print.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNABLE = {"python", "sh"}
FENCE = re.compile(r"^```(\S*)\s*$")
NOT_RUN = re.compile(r"^<!--\s*not run:\s*\S.*-->\s*$")
FILE_HEADER = re.compile(r"^# ([\w.-]+\.py)\b")
PRINTS = re.compile(r"\bIt prints (.*?)\.(?:\s|$)", re.S)


class Block(NamedTuple):
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marked: bool  # a <!-- not run: ... --> comment right above


def doc_paths() -> List[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))


def blocks(path: str) -> List[Block]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: unclosed code fence"
        prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        out.append(Block(os.path.relpath(path, ROOT), i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n", bool(NOT_RUN.match(prev))))
        i = j + 1
    return out


def split_files(code: str) -> Dict[str, str]:
    """{name: source} of a block made of `# NAME.py` files; {} for an unnamed block."""
    if not FILE_HEADER.match(code):
        return {}
    files: Dict[str, List[str]] = {}
    for line in code.splitlines(keepends=True):
        m = FILE_HEADER.match(line)
        if m:
            files[m.group(1)] = []
        files[list(files)[-1]].append(line)
    return {name: "".join(text) for name, text in files.items()}


def runs(path: str) -> List[tuple]:
    """(label, argv-kind, text) of what running the document's examples means, in order."""
    bs = [b for b in blocks(path) if b.lang in RUNNABLE and not b.marked]
    files: Dict[str, str] = {}
    for b in bs:
        if b.lang == "python":
            files.update(split_files(b.code))
    out = []
    for b in bs:
        named = split_files(b.code) if b.lang == "python" else {}
        if not named:
            out.append((f"{b.doc}:{b.line}", b.lang, b.code))
        for name in named:
            if not any(f'"{name}"' in text for other, text in files.items() if other != name):
                out.append((f"{b.doc}:{b.line}:{name}", "file", name))
    return out


def expected_lines(path: str) -> List[str]:
    """The backticked strings of the document's "It prints ..." sentences."""
    text = Path(path).read_text(encoding="utf-8")
    return [s for m in PRINTS.finditer(text) for s in re.findall(r"`([^`]+)`", m.group(1))]


def _params():
    return [pytest.param(p, id=os.path.relpath(p, ROOT)) for p in doc_paths()]


@pytest.mark.parametrize("path", _params())
def test_every_block_is_runnable_or_marked(path):
    hidden = [n for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1) if re.match(r"^(\s+```|~~~)", line)]
    assert not hidden, f"{path}: fences this test does not read (indented, or ~~~) at lines {hidden}: start code blocks with ``` in column 0"
    for b in blocks(path):
        assert b.lang, f"{b.doc}:{b.line}: a code block without a language: tag it python/sh to run it, text (or <!-- not run: why -->) not to"
        assert b.lang in RUNNABLE or b.lang == "text" or b.marked, (
            f"{b.doc}:{b.line}: ```{b.lang} is neither run nor marked: use python/sh, text, or <!-- not run: why --> above it"
        )


def _run(argv, cwd, label):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("PYTHONPATH", None)
    try:
        out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{label}: still running after 60 s; output so far: {e.stdout!r} {e.stderr!r}")
    assert out.returncode == 0, f"{label} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.mark.parametrize("path", [p for p in _params() if runs(p.values[0])])
def test_doc_examples_run(path, tmp_path):
    todo = runs(path)
    for b in blocks(path):
        if b.lang == "python":
            for name, text in split_files(b.code).items():
                (tmp_path / name).write_text(text)
    printed = []
    for label, kind, text in todo:
        if kind == "file":
            printed += _run([sys.executable, text], tmp_path, label).splitlines()
        elif kind == "python":
            printed += _run([sys.executable, "-c", text], tmp_path, label).splitlines()
        else:
            printed += _run(["bash", "-euo", "pipefail", "-c", text], tmp_path, label).splitlines()
    missing = [s for s in expected_lines(path) if s not in printed]
    assert not missing, f"the document says it prints {missing}; the examples printed {printed}"


def readme_example(tmp_path, first: str) -> list:
    """stdout lines of the README file `first`, run beside the other files of the README."""
    for b in blocks(os.path.join(ROOT, "README.md")):
        for name, text in split_files(b.code).items():
            (tmp_path / name).write_text(text)
    return _run([sys.executable, first], tmp_path, first).splitlines()


def test_readme_first_example_prints_what_it_says(tmp_path):
    assert readme_example(tmp_path, "host.py") == ["b'hello'", "1 b'world'"]


def test_readme_rpc_example_prints_what_it_says(tmp_path):
    assert readme_example(tmp_path, "rpc_host.py") == ["3", "9900", "[0, 1, 2, 3, 4]", "[2. 2. 2.] False", "remote: division by zero"]


def test_rules_themselves(tmp_path):
    """The extraction rules on a made-up document: what is run, what is a helper, what is marked."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```python\n# g.py\nprint(1)\n```\n\n<!-- not run: needs a PATH -->\n```sh\nshmhub inspect PATH\n```\n\n"
        '```python\n# h.py\nspawn("g.py")\n# i.py\nx = 1\n```\n\n```text\nout\n```\n\n```python\nprint(2)\n```\n'
    )
    bs = blocks(str(doc))
    assert [(b.lang, b.marked) for b in bs] == [("python", False), ("sh", True), ("python", False), ("text", False), ("python", False)]
    assert split_files(bs[2].code) == {"h.py": '# h.py\nspawn("g.py")\n', "i.py": "# i.py\nx = 1\n"}
    assert [(kind, text) for _, kind, text in runs(str(doc))] == [("file", "h.py"), ("file", "i.py"), ("python", "print(2)\n")]
    doc.write_text("Run it. It prints `a b` and\n`c`, in order. Then `d`.\n")
    assert expected_lines(str(doc)) == ["a b", "c"]
