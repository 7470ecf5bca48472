"""Ray Serve against a local Ray cluster: the checks in ray_serve_cluster.py, run by a pytest
process of their own. A Ray driver exits its whole process when its raylet or GCS goes away (the
core worker's quick exit, status 1, nothing printed), and that must fail this test, not end
the suite around it. The inner run's own per-test timeout fires well before this test's, so a
hang there is reported with the inner stacks instead of being cut off by the outer timeout."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
INNER_TEST_TIMEOUT_S = 300          # per check, the cluster's start included in the first
CHECKS = Path(__file__).with_name("ray_serve_cluster.py")


@pytest.mark.timeout(6 * INNER_TEST_TIMEOUT_S)
def test_replicas_on_a_local_ray_cluster():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "-o", f"timeout={INNER_TEST_TIMEOUT_S}", str(CHECKS)],
                          capture_output=True, text=True, timeout=5 * INNER_TEST_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-3000:]
    assert re.search(r"^4 passed", done.stdout, re.M), done.stdout[-3000:]  # none skipped
