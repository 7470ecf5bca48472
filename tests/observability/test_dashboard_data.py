"""The live page's arithmetic (server/dashboard.py) on a real prometheus_client registry:
rates between samples, Prometheus's histogram_quantile, gauges, and what the page is sent.
"""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from loadtest.promql import histogram_quantile
from server.dashboard import QUANTILE_WINDOW, History, charts, read_registry, table_bytes

INF = math.inf


@pytest.mark.parametrize("q, buckets, expected", [
    (0.5, {0.1: 2, 0.5: 6, 1.0: 8, INF: 8}, 0.3),     # rank 4 in (0.1, 0.5]: 0.1 + 0.4 * 2/4
    (1.0, {0.1: 2, 0.5: 6, 1.0: 8, INF: 8}, 1.0),
    (0.25, {0.1: 4, 0.5: 6, INF: 8}, 0.05),            # first bucket interpolates from 0
    (0.9, {0.1: 0, 0.5: 1, INF: 10}, 0.5),             # beyond the last finite bound: that bound
    (0.5, {0.1: 0, INF: 0}, None),                     # no observations
    (0.5, {0.1: 3}, None),                             # no +Inf bucket
])
def test_histogram_quantile_matches_prometheus_rules(q, buckets, expected):
    got = histogram_quantile(q, buckets)
    assert got == expected if expected is None else got == pytest.approx(expected)


@pytest.fixture
def metrics():
    r = CollectorRegistry()
    m = {
        "registry": r,
        "tokens": Counter("engram_serve_generation_tokens", "t", ["model_name"], registry=r).labels("m"),
        "success": Counter("engram_serve_request_success", "s", ["model_name", "finished_reason"], registry=r),
        "running": Gauge("engram_serve_num_requests_running", "r", ["model_name"], registry=r).labels("m"),
        "wait": Histogram("engram_prefetch_wait_seconds", "w", ["layer"], buckets=[0.01, 0.1, 1.0], registry=r),
        "gate": Gauge("engram_gate_mean", "g", ["layer"], registry=r),
        "bytes": Gauge("engram_table_bytes", "b", ["layer", "placement"], registry=r),
        "other": Counter("process_unrelated", "not sampled", registry=r),
    }
    return m


def test_rates_gauges_and_quantiles_from_samples(metrics):
    h = History()
    h.add(100.0, read_registry(metrics["registry"]))
    metrics["tokens"].inc(40)
    metrics["success"].labels("m", "stop").inc(2)
    metrics["running"].set(3)
    for layer, seconds in (("1", 0.005), ("1", 0.05), ("15", 0.5)):
        metrics["wait"].labels(layer).observe(seconds)
    metrics["gate"].labels("1").set(0.25)
    h.add(102.0, read_registry(metrics["registry"]))
    metrics["tokens"].inc(10)
    metrics["success"].labels("m", "length").inc(4)
    h.add(104.0, read_registry(metrics["registry"]))
    metrics["success"].labels("m", "length").inc(4)
    h.add(106.0, read_registry(metrics["registry"]))

    assert not any(name.startswith("process_") for name in h.samples[-1])
    assert h.rate("engram_serve_generation_tokens_total") == {"": [20.0, 5.0, 0.0]}
    # a label value that appears later has a gap, not a made-up zero (as rate() in Prometheus)
    assert h.rate("engram_serve_request_success_total", "finished_reason") == {
        "length": [None, None, 2.0], "stop": [None, 0.0, 0.0]}
    assert h.gauge("engram_serve_num_requests_running") == {"": [3.0, 3.0, 3.0]}
    assert h.gauge("engram_gate_mean", "layer") == {"1": [0.25, 0.25, 0.25]}
    # one observation in each of (0, 0.01], (0.01, 0.1], (0.1, 1]: rank 1.5 is half-way into the second
    assert h.quantiles("engram_prefetch_wait_seconds")[0.5][""][0] == pytest.approx(0.055)
    per_layer = h.quantiles("engram_prefetch_wait_seconds", (0.5, 1.0), "layer")
    assert per_layer[0.5]["1"][0] == pytest.approx(0.01) and per_layer[0.5]["15"][0] == pytest.approx(0.55)
    assert per_layer[1.0]["1"] == [pytest.approx(0.1)] * 3  # the window still holds the observations


def test_quantile_window_forgets_old_observations(metrics):
    h = History()
    metrics["wait"].labels("1").observe(0.5)
    for i in range(QUANTILE_WINDOW + 2):
        h.add(float(i), read_registry(metrics["registry"]))
    values = h.quantiles("engram_prefetch_wait_seconds")[0.99][""]
    assert values == [None] * (QUANTILE_WINDOW + 1)  # the one observation predates every window


def test_counter_reset_is_not_a_negative_rate(metrics):
    h = History()
    metrics["tokens"].inc(100)
    h.add(0.0, read_registry(metrics["registry"]))
    sample = read_registry(metrics["registry"])
    sample["engram_serve_generation_tokens_total"] = [({"model_name": "m"}, 0.0)]  # a restarted process
    h.add(1.0, sample)
    assert h.rate("engram_serve_generation_tokens_total") == {"": [0.0]}


def test_history_is_bounded_and_charts_are_json(metrics):
    h = History(max_samples=5)
    metrics["bytes"].labels("1", "host").set(1000)
    metrics["bytes"].labels("15", "host").set(500)
    metrics["bytes"].labels("15", "mmap").set(7)
    metrics["gate"].labels("1").set(math.nan)
    for i in range(12):
        metrics["tokens"].inc(i)
        h.add(float(i), read_registry(metrics["registry"]))
    assert list(h.times) == [7.0, 8.0, 9.0, 10.0, 11.0]
    assert table_bytes(h.samples[-1]) == {"host": 1500.0, "mmap": 7.0}
    out = charts(h)
    json.dumps(out, allow_nan=False)  # NaN would break the page's JSON.parse
    by_id = {c["id"]: c for c in out}
    assert by_id["throughput"]["series"][0] == {"name": "generation", "values": [8.0, 9.0, 10.0, 11.0]}
    assert by_id["gate"]["series"] == [{"name": "layer 1", "values": [None] * 4}]
    assert {c["group"] for c in out} == {"serving", "engram"}
