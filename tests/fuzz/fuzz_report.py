"""Summarise a `make fuzz` run: per target, inputs executed, speed, coverage, new corpus entries,
crashes, hangs (libFuzzer timeouts) and out-of-memory artifacts, read from FUZZ_DIR.

    python tests/fuzz/fuzz_report.py FUZZ_DIR TARGET...
"""

from __future__ import annotations

import os
import re
import sys


def _stat(log: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s+(\d+)", log)
    return int(m.group(1)) if m else 0


def main() -> None:
    root, targets = sys.argv[1], sys.argv[2:]
    rows = []
    total = bad = 0
    for t in targets:
        try:
            with open(os.path.join(root, f"{t}.log"), errors="replace") as f:
                log = f.read()
        except FileNotFoundError:
            log = ""
        runs = _stat(log, "number_of_executed_units")
        speed = _stat(log, "average_exec_per_sec")
        cov = re.findall(r"cov: (\d+)", log)
        arts = [a for a in os.listdir(root) if a.startswith(f"{t}-")]
        crashes = sum(a.startswith(f"{t}-crash-") for a in arts)
        hangs = sum(a.startswith(f"{t}-timeout-") for a in arts)
        ooms = sum(a.startswith(f"{t}-oom-") or a.startswith(f"{t}-leak-") for a in arts)
        new = len(os.listdir(os.path.join(root, t))) if os.path.isdir(os.path.join(root, t)) else 0
        total += runs
        bad += crashes + hangs + ooms
        rows.append((t, runs, speed, cov[-1] if cov else "?", new, crashes, hangs, ooms))
    print("| target | inputs | inputs/s | coverage | corpus | crashes | hangs | oom |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(f"| **total** | {total} | | | | {bad} (crashes + hangs + oom) | | |")


if __name__ == "__main__":
    main()
