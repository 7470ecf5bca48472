"""Reading a live server's /metrics in tests: exact values by name and labels, so a test can
assert metric deltas after a known workload (start the server with `harness.process`)."""

from __future__ import annotations

import httpx


def scrape_metrics(client: httpx.Client) -> dict[str, float]:
    """GET /metrics as {'name{labels}': value}."""
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def metric_value(values: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if there are none)."""
    total = 0.0
    for key, value in values.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total
