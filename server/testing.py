"""Start a real `engram-serve` in a subprocess on a free loopback port (for tests of any area).

    with ServerProcess(["--no-engram", "--max-model-len", "128"]) as srv:
        httpx.get(srv.url("/health"))

The child runs `python -m server.cli` from this checkout, in its own process group, with
its output in a log file; if it dies or never becomes healthy, the error quotes the log's
tail, so a failing fixture shows the server's own message.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def scrape_metrics(client: httpx.Client) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value}."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric_value(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if there are none)."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


class ServerStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, startup_timeout: float = 300.0,
                 log_path: str | Path | None = None, wait_ready: bool = True):
        self.args = list(args)
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.wait_ready = wait_ready
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="engram-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.health_seen: list[tuple[int, str]] = []  # distinct (status, state) answers while starting

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> "ServerProcess":
        argv = [sys.executable, "-m", "server.cli", "--host", self.host, "--port", str(self.port), *self.args]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **self.env}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                         start_new_session=True)
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"engram-serve exited with code {self.proc.returncode}; log "
                                       f"{self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url("/health"), timeout=2)
                seen = (r.status_code, r.json().get("status"))
                if seen not in self.health_seen:
                    self.health_seen.append(seen)
                if r.status_code == 200:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"engram-serve not healthy after {self.startup_timeout:.0f} s; log "
                               f"{self.log_path}:\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL to the process group if it does not exit in `timeout` seconds."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
