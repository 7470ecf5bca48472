"""Backpressure (429), graceful drain on SIGTERM (503, in-flight finishes, exit 0), a server without Engram.

Uses `small_server` (conftest.py): one running sequence, a queue of one, no Engram. The drain
test stops it, so it runs last in this module.
"""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from server_metrics import metric, scrape

pytestmark = pytest.mark.slow

# Long enough (seconds on 2 cores) that it is still running when the next request or signal lands,
# however fast the machine: a 40-token one once finished within the drain test's first 0.3 s.
LONG = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "temperature": 0}


def _stream_until_first_token(client: httpx.Client, body: dict):
    cm = client.stream("POST", "/v1/completions", json={**body, "stream": True})
    resp = cm.__enter__()
    assert resp.status_code == 200
    lines = resp.iter_lines()
    assert next(lines).startswith("data: {")
    return cm, lines


def test_metrics_without_engram(small_server):
    with httpx.Client(base_url=small_server.base_url) as c:
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
        assert r.status_code == 200
        text = c.get("/metrics").text
        values = scrape(c)
        # the engine records a step's duration after emitting its tokens, so the response can be
        # complete one step before the histogram counts that step: wait for it (bounded)
        deadline = time.monotonic() + 10
        while metric(values, "engram_serve_step_seconds_count") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            values = scrape(c)
    for family in ("engram_table_lookups_total", "engram_cache_hits_total", "engram_table_rows_touched_ratio",
                   "engram_table_bytes", "engram_prefetch_wait_seconds", "engram_gather_seconds",
                   "engram_gather_bytes_total", "engram_gather_rows_total", "engram_gate_mean",
                   "engram_serve_step_seconds"):
        assert f"# TYPE {family} " in text
    assert not any(name == "engram_table_lookups_total" for name, _ in values)  # no layer, no sample
    assert metric(values, "engram_serve_generation_tokens_total") == 2
    assert metric(values, "engram_serve_step_seconds_count") >= 2
    bad = httpx.post(small_server.url("/v1/completions"), json={"prompt": "x", "engram_gates": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "engram_gates"


def test_429_when_queue_full(small_server):
    with httpx.Client(base_url=small_server.base_url, timeout=60) as c:
        running, _ = _stream_until_first_token(c, LONG)           # takes the one running slot
        waiting = threading.Thread(target=lambda: c.post("/v1/completions", json={**LONG, "max_tokens": 2}))
        waiting.start()                                             # takes the one queue slot
        deadline = time.monotonic() + 10
        while metric(scrape(c), "engram_serve_num_requests_waiting") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        too_many = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "n": 3})
        assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
        running.__exit__(None, None, None)                          # disconnect: frees the slot
        waiting.join(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            if r.status_code == 200:
                break
            time.sleep(0.1)
        assert r.status_code == 200


def test_sigterm_drains_then_exits(small_server):
    c = httpx.Client(base_url=small_server.base_url, timeout=60)
    results = {}
    inflight = threading.Thread(target=lambda: results.update(r=c.post("/v1/completions", json=LONG)))
    inflight.start()
    deadline = time.monotonic() + 10
    while metric(scrape(c), "engram_serve_num_requests_running") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    small_server.signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (health := c.get("/health")).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.02)  # until the signal handler has run
    assert health.status_code == 503 and health.json()["status"] == "draining"
    refused = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
    inflight.join(60)
    r = results["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == LONG["max_tokens"]
    assert small_server.proc.wait(30) == 0
    c.close()
