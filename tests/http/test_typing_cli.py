"""shmhub.http stays mypy --strict clean; `shmhub serve` refuses bad arguments with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shmhub import cli
from shmhub.http import WorkerPool
from shmhub.http._serve import parse_bind
from shmhub.http._worker import detect_interface, load_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_http_package_is_strictly_typed():
    pytest.importorskip("mypy")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--ignore-missing-imports",
            "--cache-dir",
            os.path.join(ROOT, ".mypy_cache"),
            "src/shmhub/http",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("bind", ["8000", "host:", "host:port", "h:70000", ""])
def test_a_malformed_bind_is_refused(bind, capsys):
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_bind(bind)
    assert cli.main(["serve", "apps.star:app", "--bind", bind]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_bind_forms():
    assert parse_bind("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_bind("[::1]:8080") == ("::1", 8080)
    assert parse_bind(":80") == ("0.0.0.0", 80)


def test_pool_arguments_are_checked():
    for kw in ({"workers": 0}, {"workers": 1, "max_in_flight": 0}, {"workers": 1, "queue": -1}):
        with pytest.raises(ValueError):
            WorkerPool(["true"], **kw)  # type: ignore[arg-type]


def test_interface_detection_and_app_loading():
    async def asgi(scope, receive, send): ...

    def wsgi(environ, start_response): ...

    class AsgiObj:
        async def __call__(self, scope, receive, send): ...

    assert detect_interface(asgi) == "asgi" and detect_interface(AsgiObj()) == "asgi"
    assert detect_interface(wsgi) == "wsgi"
    with pytest.raises(ValueError, match="neither ASGI"):
        detect_interface(lambda: None)
    assert load_app("os.path:join") is os.path.join
    with pytest.raises(ValueError, match="MODULE:ATTRIBUTE"):
        load_app("os.path")
