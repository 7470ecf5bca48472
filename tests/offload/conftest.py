"""Every offload test gets its own shared-table directory under /dev/shm (placement shared),
removed afterwards, so no test reads another's copies or leaves any in /dev/shm/engram-serve."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from offload.shared import DIR_ENV


@pytest.fixture(autouse=True)
def shared_dir(monkeypatch) -> Path:
    path = Path(tempfile.mkdtemp(prefix="engram-test-", dir="/dev/shm"))
    monkeypatch.setenv(DIR_ENV, str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)
