"""Run a real redis-server on 127.0.0.1 for the shared-store tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional

import pytest

# CI sets this: there the shared-store tests must run, never skip.
REQUIRED = os.environ.get("NORMSERVE_REQUIRE_REDIS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="normserve-redis-")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.port = 0
        self.persist = False  # appendonly + fsync always: a restart keeps the data

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 5) -> "RedisProcess":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (Debian: apt-get install redis-server)")
        for _ in range(attempts):  # a free port can be taken between the check and the bind
            self.port = _free_port()
            if self._launch(binary):
                return self
        raise RuntimeError("redis-server did not start: " + self.log())

    def restart(self) -> None:
        """Start again on the same port (after stop())."""
        binary = shutil.which("redis-server")
        assert binary is not None
        if not self._launch(binary):
            raise RuntimeError("redis-server did not restart: " + self.log())

    def _launch(self, binary: str) -> bool:
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", *persistence,
             "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        if self._wait_ready():
            return True
        self.stop()
        return False

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_or_skip(persist: bool = False) -> RedisProcess:
    """A started redis-server; skips the test when none can run here (fails under CI)."""
    proc = RedisProcess()
    proc.persist = persist
    try:
        return proc.start()
    except (FileNotFoundError, RuntimeError) as e:
        if REQUIRED:
            raise
        pytest.skip(f"no redis-server for the shared-store tests: {e}")
