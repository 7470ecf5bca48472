"""A real engram-serve with Engram tables and a hot-row cache, a real Prometheus scraping it,
and a steady background load, shared by the PromQL and the headless-browser tests.

Both tests need the same thing, a server whose every metric has moved, so the server
starts once per session (tens of seconds on 2 busy cores) and the load keeps running
while the tests look at it.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from engram_runtime.checkpoint_init import InitOptions, engram_init
from loadtest.process import ServerProcess, engram_serve_cmd, free_port

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SCRAPE_INTERVAL = "1s"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "Alexander Graham Bell invented the", "The quick brown fox"]


class BackgroundLoad:
    """A few client threads sending short completions until stopped; counts what finished."""

    def __init__(self, base_url: str, concurrency: int = 3, max_tokens: int = 12):
        self.base_url, self.concurrency, self.max_tokens = base_url, concurrency, max_tokens
        self.completed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(concurrency)]

    def _worker(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=120) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            i = index
            while not self._stop.is_set():
                body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": self.max_tokens,
                        "temperature": 0.8, "seed": i, "stream": i % 2 == 0}
                r = client.post("/v1/completions", json=body)
                with self._lock:
                    if r.status_code == 200:
                        self.completed += 1
                    else:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                i += self.concurrency

    def start(self) -> "BackgroundLoad":
        for t in self._threads:
            t.start()
        return self

    def wait_for(self, completed: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.completed < completed:
            assert not self.errors, self.errors[:3]
            assert time.monotonic() < deadline, f"only {self.completed} requests completed in {timeout:.0f} s"
            time.sleep(0.2)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


class PrometheusProcess:
    """/usr/bin/prometheus on a free loopback port, scraping `target` with docker/prometheus.yml's job."""

    def __init__(self, target: str, workdir: Path):
        config = yaml.safe_load((REPO / "docker" / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = SCRAPE_INTERVAL
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [target]}]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log_path.read_text()[-2000:]}"
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after {timeout:.0f} s:\n{self.log_path.read_text()[-2000:]}")

    def query(self, expr: str) -> dict:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=30)
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _require(binary: str) -> None:
    if not Path(binary).exists() and shutil.which(Path(binary).name) is None:
        pytest.skip(f"{binary} is not installed (`make system-deps` installs it)")


@pytest.fixture(scope="package")
def observed_server(tmp_path_factory):
    """(server, prometheus, load): all three running until this package's last test (package scope
    needs the __init__.py beside this file; without it the load ran on through the rest of the
    suite, taking a core from every later test)."""
    _require(PROMETHEUS)
    ckpt = tmp_path_factory.mktemp("obs-engram") / "tiny"
    engram_init(InitOptions(out=ckpt, rows_per_head=2000, dtype="float32", progress=False))
    logs = tmp_path_factory.mktemp("obs-logs")
    args = ["--engram", str(ckpt), "--cache-rows", "2000", "--max-model-len", "96", "--max-num-seqs", "4"]
    with ServerProcess(engram_serve_cmd(args), logs / "engram-serve.log") as server:
        prometheus = PrometheusProcess(f"{server.host}:{server.port}", logs)
        load = BackgroundLoad(server.base_url).start()
        try:
            yield server, prometheus, load
        finally:
            load.stop()
            prometheus.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
