"""Start and stop a server process on a free loopback port (for ``compare``).

The server runs in its own session so stopping it (SIGTERM, then SIGKILL after a
grace period) also ends any worker it spawned; its output goes to a log file
whose tail is quoted when it fails to come up, so a bad flag reads as the
server's own error message rather than a timeout.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


def default_server_cmd() -> list[str]:
    """``engram-serve`` when installed, else the module it points at."""
    exe = shutil.which("engram-serve")
    return [exe] if exe else [sys.executable, "-m", "server.cli"]


def repo_env() -> dict[str, str]:
    """The environment with this checkout on PYTHONPATH, so ``python -m server.cli`` and
    friends work from any directory even when the project is not pip-installed."""
    repo = str(Path(__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": repo + (os.pathsep + path if path else "")}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class ServerProcess:
    """``with ServerProcess(cmd, log_path) as srv: ... srv.base_url ...``"""

    def __init__(self, cmd: list[str], log_path: Path, host: str = "127.0.0.1",
                 startup_timeout: float = 900.0, stop_timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.launch()
        self.wait_healthy()

    def launch(self) -> None:
        """Spawn the process and return at once (``wait_healthy`` waits), so several
        servers can load their models at the same time."""
        self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.cmd + ["--host", self.host, "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**repo_env(), **(self.env or {})},
            )
        self.started = time.monotonic()

    def wait_healthy(self) -> None:
        deadline = self.started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(
                    f"server exited with code {self.proc.returncode} before it was healthy; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            try:
                if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(
            f"server not healthy after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def kill(self) -> None:
        """Hard kill (SIGKILL), as a crash would; for tests of failure handling."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
