"""Ray Serve against a local Ray cluster: the checks in ray_serve_cluster.py, run by a pytest
process of their own. A Ray driver exits its whole process when its raylet or GCS goes away (the
core worker's quick exit, status 1, nothing printed), and that must fail this test, not end
the suite around it."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
CHECKS = Path(__file__).with_name("ray_serve_cluster.py")


def test_replicas_on_a_local_ray_cluster():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(CHECKS)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert re.search(r"^4 passed", done.stdout, re.M), done.stdout[-3000:]  # none skipped
