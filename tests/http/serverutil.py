"""A real `shmhub serve` in a child process on 127.0.0.1 (an ephemeral port), for the HTTP tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Sequence

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
READY = re.compile(r"shmhub serve: (http://[\d.]+:\d+) with")


class Server:
    """Starts the front, waits for its ready line (stderr), keeps its log; stop() sends SIGTERM."""

    def __init__(self, argv: Sequence[str], start_timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(list(argv), cwd=HERE, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: List[str] = []
        self.url = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(start_timeout) or not self.url:
            self.stop()
            raise RuntimeError("the server did not start:\n" + self.log)

    @classmethod
    def cli(cls, app: str, *args: str) -> "Server":
        return cls([sys.executable, "-m", "shmhub", "serve", app, "--bind", "127.0.0.1:0", *args])

    @classmethod
    def python(cls, code: str) -> "Server":
        return cls([sys.executable, "-c", code])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def health(self) -> Dict[str, Any]:
        r = httpx.get(self.url + "/_shmhub/health", timeout=5.0)
        return json.loads(r.content)

    def live_pids(self) -> List[int]:
        return [w["pid"] for w in self.health()["workers"] if not w["retiring"]]

    def wait_health(self, pred: Any, timeout: float = 10.0) -> Dict[str, Any]:
        """The health document once pred(health) holds (the front has no push channel to watch)."""
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if pred(h):
                return h
            if time.monotonic() > deadline:
                raise AssertionError(f"health never satisfied the condition: {h}")
            time.sleep(0.02)

    def wait_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared in the log:\n{self.log}")
            time.sleep(0.02)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(5.0)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        return code

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc: object) -> None:
        code = self.stop()
        # uvicorn drains, then re-raises the SIGTERM it caught: the conventional exit status.
        assert code in (0, -signal.SIGTERM), f"the front exited with {code}:\n{self.log}"
        assert "Exception in ASGI application" not in self.log, self.log  # uvicorn's words for a gateway crash
