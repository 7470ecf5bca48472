"""A live server's /metrics in tests: exact values by name and labels, so a test can assert
metric deltas after a known workload. Parsed by the load tester's reader, as a client sees it."""

from __future__ import annotations

import httpx

from loadtest.scrape import Samples, parse_metrics


def scrape(client: httpx.Client) -> Samples:
    return parse_metrics(client.get("/metrics").text)


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if there are none)."""
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= set(sample_labels))
