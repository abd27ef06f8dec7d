from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from serverutil import Server  # noqa: E402


@pytest.fixture(scope="module")
def star() -> Iterator[Server]:
    """The Starlette app behind `shmhub serve --workers 2`, shared by a module's tests."""
    with Server.cli("apps.star:app", "--workers", "2", "--timeout", "20") as s:
        yield s


@pytest.fixture(scope="module")
def flask_server() -> Iterator[Server]:
    pytest.importorskip("flask")
    with Server.cli("apps.fl:app", "--workers", "2", "--timeout", "20") as s:
        yield s
