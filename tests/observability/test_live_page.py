"""/dashboard in real headless Chromium against a live engram-serve under load: every chart
received data points, the page polled more than once, and a screenshot is saved to
tests/artifacts/dashboard.png for a human to look at.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import time
from html.parser import HTMLParser

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHARTS = {"throughput", "requests", "running", "kv", "ttft", "itl", "e2e", "queue", "wait", "hits", "rows", "bytes",
          "touched", "gate"}


def chromium(url: str, user_data_dir, *extra: str, timeout: float = 120.0) -> str:
    """Run headless Chromium once; virtual time lets the page's timers and polls run ahead quickly."""
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={user_data_dir}", "--virtual-time-budget=7000", *extra, url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class ChartAttrs(HTMLParser):
    """Collects data-points of every chart card and data-updates of <body>."""

    def __init__(self):
        super().__init__()
        self.points: dict[str, int] = {}
        self.updates = 0
        self.model = ""
        self._in_model = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.updates = int(a.get("data-updates", 0))
        if "chart" in (a.get("class") or "").split() and a.get("id", "").startswith("chart-"):
            self.points[a["id"].removeprefix("chart-")] = int(a["data-points"])
        self._in_model = a.get("id") == "model"

    def handle_data(self, data):
        if self._in_model:
            self.model += data
            self._in_model = False


def wait_for_history(base_url: str, samples: int = 4, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = httpx.get(base_url + "/dashboard/data", timeout=10).json()
        if len(data["times"]) >= samples and all(any(v is not None for s in c["series"] for v in s["values"])
                                                 for c in data["charts"]):
            return data
        time.sleep(1)
    raise AssertionError(f"/dashboard/data has no full history after {timeout:.0f} s: {data}")


@pytest.mark.slow
def test_dashboard_page_draws_live_data(observed_server, artifacts, tmp_path):
    if shutil.which(CHROMIUM) is None:
        pytest.skip("chromium is not installed (`make system-deps` installs it)")
    server, _, load = observed_server
    load.wait_for(completed=3)
    data = wait_for_history(server.base_url)
    assert {c["id"] for c in data["charts"]} == CHARTS

    dom = chromium(server.url("/dashboard"), tmp_path / "profile-dom", "--dump-dom")
    page = ChartAttrs()
    page.feed(dom)
    assert set(page.points) == CHARTS, dom[:2000]
    empty = [c for c, n in page.points.items() if n == 0]
    assert not empty, f"charts without data: {empty}"
    assert page.updates >= 2, "the page should have polled /dashboard/data again"
    assert page.model == data["model"]
    assert re.search(r'class="tile".*tables · host', dom), "table bytes per placement tile missing"

    shot = artifacts / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(server.url("/dashboard"), tmp_path / "profile-shot", f"--screenshot={shot}",
             "--window-size=1400,1500", "--hide-scrollbars")
    header = shot.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (1400, 1500)
    assert shot.stat().st_size > 30_000  # a blank page compresses to a few KB
    assert not load.errors, load.errors[:3]
