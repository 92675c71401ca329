"""Run faust workers as real processes, each with its own app id, data dir and web port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started that are still running (a worker's readers), from /proc."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll `condition` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


class Worker:
    """One worker process started from a module and an environment."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: Mapping[str, str],
        log_path: Path,
        web_port: int | None = None,
    ) -> None:
        self.argv = argv
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.web_port = web_port
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @classmethod
    def faust(
        cls,
        app: str,
        *,
        env: Mapping[str, str],
        data_dir: Path,
        web_port: int,
        log_path: Path,
    ) -> Worker:
        argv = [
            sys.executable,
            "-m",
            "faust",
            "-A",
            app,
            "worker",
            "-l",
            "info",
            "--web-host",
            "127.0.0.1",
            "--web-port",
            str(web_port),
        ]
        env = {**env, "CP_DATA_DIR": str(data_dir), "CP_WEB_PORT": str(web_port)}
        return cls(argv, env=env, log_path=log_path, web_port=web_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def start(self) -> Worker:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._close_log()
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, path: str = "/readyz", timeout: float = 90.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"worker exited early; log:\n{self.tail()}")
            return http_get(self.url + path, timeout=2)[0] == 200

        try:
            wait_for(ready, timeout=timeout, what=f"{self.url}{path}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.tail()}") from None

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop gracefully with SIGTERM, killing it if it does not end in time."""
        try:
            if self.process is None or self.process.poll() is not None:
                return None if self.process is None else self.process.returncode
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait(timeout=10)
        finally:
            self._close_log()

    def kill(self) -> None:
        """Crash it: SIGKILL, no clean-up, no final commit."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._close_log()
