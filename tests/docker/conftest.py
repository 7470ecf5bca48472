"""The `docker` marker: tests that build and run the image for real (minutes, a Docker engine,
network to PyPI). They are skipped unless the marker is asked for: `make test-docker` runs
`pytest -m docker tests/docker`. The configuration checks beside them run in `make test`."""

from __future__ import annotations

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "docker: builds and runs the Docker image (make test-docker)")


def pytest_collection_modifyitems(config, items):
    if "docker" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="builds the Docker image (minutes): run `make test-docker`")
    for item in items:
        if item.get_closest_marker("docker"):
            item.add_marker(skip)
