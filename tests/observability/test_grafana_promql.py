"""Every PromQL expression of the Grafana dashboard, evaluated by a real Prometheus that
scrapes a real engram-serve under load: each must parse and return finite data.

This is what keeps docker/grafana/engram-serve.json true to the metrics the server
exports: a renamed metric or label, or a broken expression, fails here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Grafana's $__rate_interval is at least 4 scrape intervals; the test scrapes every 1 s and
# its load runs for tens of seconds, so a 30 s window holds plenty of samples.
RATE_WINDOW = "30s"
DEADLINE = 90.0  # seconds of load after which every expression must have data


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "docker" / "grafana" / "engram-serve.json").read_text())
    out = []
    for panel in dashboard["panels"]:
        for p in [panel, *panel.get("panels", [])]:
            for target in p.get("targets", []):
                out.append((f"{p['title']} / {target['refId']}", target["expr"].replace("$__rate_interval", RATE_WINDOW)))
    return out


def finite_values(result: dict) -> list[float]:
    data = result["data"]
    assert data["resultType"] == "vector", data["resultType"]
    return [float(s["value"][1]) for s in data["result"] if math.isfinite(float(s["value"][1]))]


@pytest.mark.slow
def test_every_dashboard_expression_returns_data(observed_server):
    server, prometheus, load = observed_server
    exprs = dashboard_exprs()
    assert len(exprs) >= 25 and not any("$" in e for _, e in exprs), "unsubstituted Grafana variable"
    load.wait_for(completed=6)
    deadline = time.monotonic() + DEADLINE
    pending = dict(exprs)
    last: dict[str, dict] = {}
    while pending and time.monotonic() < deadline:
        for name, expr in list(pending.items()):
            result = prometheus.query(expr)
            assert result["status"] == "success", f"{name}: {expr}\n{result.get('error')}"
            last[name] = result
            if finite_values(result):
                del pending[name]
        time.sleep(1)
    assert not pending, "no data for:\n" + "\n".join(f"{n}: {pending[n]} -> {last[n]['data']}" for n in pending)

    up = prometheus.query('up{job="engram-serve"}')
    assert finite_values(up) == [1.0]
    # The figures are not just present but plausible for the load that ran.
    value = lambda expr: sum(finite_values(prometheus.query(expr.replace("$__rate_interval", RATE_WINDOW))))
    assert value("sum(rate(engram_serve_generation_tokens_total[$__rate_interval]))") > 0
    assert value("count(engram_table_rows_touched_ratio)") == 2  # layers 1 and 15
    assert 0 < value("max(engram_table_rows_touched_ratio)") <= 1
    assert value("sum(engram_table_bytes)") > 0
    # 2000 cached rows out of ~2000 per head x 16 heads: some lookups hit, not all.
    hit_rates = finite_values(prometheus.query(
        f"sum by (layer) (rate(engram_cache_hits_total[{RATE_WINDOW}])) / "
        f"sum by (layer) (rate(engram_table_lookups_total[{RATE_WINDOW}]))"))
    assert len(hit_rates) == 2 and all(0 <= r <= 1 for r in hit_rates)
