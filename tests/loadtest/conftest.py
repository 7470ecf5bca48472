"""Fixtures for the load tester's tests: a fake OpenAI-compatible server on loopback."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadtest.process import ServerProcess

FAKE_SERVER = Path(__file__).with_name("fake_server.py")


def fake_server_cmd(token_delay: float = 0.005) -> list[str]:
    return [sys.executable, str(FAKE_SERVER), "--token-delay", str(token_delay)]


@pytest.fixture
def fake_cmd():
    """``fake_cmd(token_delay)`` -> command line of a fake server (fixtures, not imports:
    several test folders have a conftest.py)."""
    return fake_server_cmd


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory):
    """A fake server with Engram metrics, 5 ms per token, shared by a module's tests."""
    log = tmp_path_factory.mktemp("fake") / "server.log"
    with ServerProcess(fake_server_cmd() + ["--engram", "fake"], log, startup_timeout=60) as srv:
        yield srv
