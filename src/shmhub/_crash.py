"""Crash points at the Python level, for the kill-anywhere tests (docs/hardening.md).

Only a core built with SHMHUB_CRASHPOINTS=1 (`make crashpoints`) has them armed: there,
SHMHUB_CRASH_AT=name:count aborts the process at the count-th pass through point `name`, at
these and at the core's own points (_native.pyx, SHM_CRASHPOINT). In a normal build `point()`
returns at once: the environment is looked at only when this module is imported."""

from __future__ import annotations

import os

from ._native import CRASHPOINTS, crashpoint

ARMED = CRASHPOINTS and bool(os.environ.get("SHMHUB_CRASH_AT"))


def point(name: bytes) -> None:
    if ARMED:
        crashpoint(name)
