"""Run a real normserve server process on 127.0.0.1 for tests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Optional, Sequence

_READY = re.compile(r"serving grpc=(?P<grpc>\S+) metrics=(?P<metrics>\S+)")


class ServerProcess:
    """`python -m normserve serve` on port 0; the bound ports are read from its log."""

    def __init__(
        self,
        *args: str,
        env: Optional[dict[str, str]] = None,
        state_dir: Optional[str] = None,
        startup_timeout: float = 60.0,
        new_session: bool = False,
    ):
        """`state_dir` None gives the server a fresh temporary one (removed at stop()).
        `new_session` runs it in its own session, as a deployed server runs apart from its
        clients: with the kernel's autogroup scheduling a session is the unit that shares
        the CPU, so a benchmark's server must not compete inside its clients' session."""
        self._own_state_dir = state_dir is None and "--state-dir" not in args
        self.state_dir = tempfile.mkdtemp(prefix="normserve-state-") if self._own_state_dir else state_dir
        if self.state_dir is not None:
            args = (*args, "--state-dir", self.state_dir)
        self.args: Sequence[str] = args
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout = startup_timeout
        self.new_session = new_session
        self.lines: list[str] = []
        self.proc: Optional[subprocess.Popen[str]] = None
        self.target = ""
        self.port = 0
        self.metrics_url: Optional[str] = None
        self._ready = threading.Event()

    def start(self) -> "ServerProcess":
        # --device cpu unless a test names one: the parity suites compare with CPU torch, and
        # the server's default (auto) would compute on a GPU where one is present.
        cmd = [sys.executable, "-m", "normserve", "serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]
        cmd += ["--device", "cpu", *self.args]
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=self.new_session,
        )
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._ready.wait(self.startup_timeout):
            self.kill()
            raise RuntimeError("server did not start:\n" + self.log())
        if not self.target:  # the process ended before it logged its ports
            self.kill()
            raise RuntimeError(f"server exited ({self.proc.returncode}) before it was ready:\n" + self.log())
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            m = _READY.search(line)
            if m and not self._ready.is_set():
                self.target = m["grpc"]
                self.port = int(self.target.rsplit(":", 1)[1])
                self.metrics_url = None if m["metrics"] == "off" else m["metrics"]
                self._ready.set()
        self._ready.set()  # process ended: unblock start(), which then sees no target

    def log(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return True
            time.sleep(0.05)
        return False

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; returns the exit status (SIGKILL after `timeout`)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        status = self.proc.wait()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return status

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
