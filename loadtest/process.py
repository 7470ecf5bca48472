"""Start and stop a server process on a free loopback port: the load tester's `compare`
starts one per configuration, and every test that needs a real `engram-serve` or a
stand-in imports it from here.

    with ServerProcess(engram_serve_cmd(["--no-engram"]), log_path) as srv:
        httpx.get(srv.url("/health"))

The child runs in its own session, so stopping it (SIGTERM, then SIGKILL to the group
after a grace period) also ends anything it spawned. Its output goes to a log file whose
tail is quoted when it exits early or never becomes healthy, so a bad flag reads as the
server's own error message rather than a timeout.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time."""


def engram_serve_cmd(args: list[str] = ()) -> list[str]:
    """This checkout's server (`python -m server.cli`), whether or not it is pip-installed."""
    return [sys.executable, "-m", "server.cli", *args]


def repo_env() -> dict[str, str]:
    """The environment with this checkout on PYTHONPATH, so `python -m server.cli` and
    friends work from any directory even when the project is not pip-installed."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(REPO) + (os.pathsep + path if path else "")}


def ephemeral_ports_start() -> int:
    """Where the kernel's range of local ports for outgoing connections starts (Linux; 32768,
    its default, elsewhere: macOS's starts higher)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1", count: int = 1) -> int:
    """A port from which `count` ports are free (a data-parallel server also binds port + 1 + rank),
    drawn below the ephemeral range: a port in it can be taken by some client connection's
    local end between this check and the server's bind."""
    top = ephemeral_ports_start() - count
    for _ in range(200):
        base = random.randrange(10000, top)
        if all(_bindable(host, port) for port in range(base, base + count)):
            return base
    raise OSError(f"no {count} free consecutive ports on {host} in 10000-{top + count - 1}")


def ports_needed(cmd: list[str]) -> int:
    """The ports an engram-serve command binds from --port on: 1 + its data-parallel workers."""
    for i, arg in enumerate(cmd):
        if arg == "--data-parallel-size" and i + 1 < len(cmd):
            return 1 + int(cmd[i + 1])
        if arg.startswith("--data-parallel-size="):
            return 1 + int(arg.split("=", 1)[1])
    return 1


class ServerProcess:
    """`cmd` gets `--host` and `--port` appended. `launch()` returns at once and
    `wait_healthy()` waits, so several servers can load their models at the same time;
    `start()` (and `with`) does both."""

    def __init__(self, cmd: list[str], log_path: str | Path | None = None, host: str = "127.0.0.1",
                 startup_timeout: float = 600.0, stop_timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path or tempfile.mkstemp(prefix="engram-serve-", suffix=".log")[1])
        self.host = host
        self.port = 0
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.health_seen: list[tuple[int, str | None]] = []  # distinct (status, state) while starting

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
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> None:
        self.port = free_port(self.host, ports_needed(self.cmd))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = self.cmd + ["--host", self.host, "--port", str(self.port)]
        with open(self.log_path, "w") as log:
            log.write("$ " + " ".join(argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**repo_env(), **self.env})
        self.started = time.monotonic()

    def wait_healthy(self) -> None:
        deadline = self.started + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with code {self.proc.returncode} before it was "
                                       f"healthy; log {self.log_path}:\n{self.log_tail()}")
            try:
                r = httpx.get(self.url("/health"), timeout=2.0)
                seen = (r.status_code, _health_state(r))
                if seen not in self.health_seen:
                    self.health_seen.append(seen)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(f"server not healthy after {self.startup_timeout:.0f} s; log "
                               f"{self.log_path}:\n{self.log_tail()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to the process group if it has not exited in `stop_timeout`."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _health_state(response: httpx.Response) -> str | None:
    try:
        return response.json().get("status")
    except ValueError:
        return None
