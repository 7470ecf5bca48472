"""Engram table figures from the target's Prometheus ``/metrics``, before vs after a run.

Counters and histograms are differenced (after - before) so the figures cover
exactly the run, even against a server that has been up for hours; gauges
(utilisation, table bytes, gate mean) are read after.  Quantiles come from
histogram buckets the way PromQL's ``histogram_quantile`` computes them (linear
inside the bucket), so they match what a Grafana panel would show.
Names are engram-serve's ``engram_*`` families; a target without them (vLLM, llama.cpp)
simply yields no Engram section.
"""
from __future__ import annotations

from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtest.promql import histogram_quantile

Key = tuple[str, tuple[tuple[str, str], ...]]
Samples = dict[Key, float]


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


async def fetch_metrics(client: httpx.AsyncClient, base_url: str) -> Samples | None:
    """The target's samples, or None when it has no usable ``/metrics``."""
    try:
        resp = await client.get(base_url + "/metrics", timeout=10.0)
        if resp.status_code != 200:
            return None
        return parse_metrics(resp.text)
    except (httpx.HTTPError, ValueError):
        return None


def delta(after: Samples, before: Samples) -> Samples:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _total(samples: Samples, name: str) -> float | None:
    vals = [v for (n, _), v in samples.items() if n == name]
    return sum(vals) if vals else None


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name:
            out[dict(labels).get(label, "")] += v
    return dict(out)


def _buckets(samples: Samples, name: str) -> dict[float, float]:
    """Buckets of a histogram summed over every label set but ``le``."""
    out: dict[float, float] = defaultdict(float)
    for (n, labels), v in samples.items():
        if n == name + "_bucket":
            out[float(dict(labels)["le"])] += v
    return dict(out)


def _histogram_ms(d: Samples, name: str, prefix: str) -> dict[str, float]:
    out: dict[str, float] = {}
    buckets = _buckets(d, name)
    count = _total(d, name + "_count")
    if count:
        out[f"{prefix}_mean_ms"] = 1000.0 * (_total(d, name + "_sum") or 0.0) / count
    for q, tag in ((0.5, "p50"), (0.99, "p99")):
        v = histogram_quantile(q, buckets)
        if v is not None:
            out[f"{prefix}_{tag}_ms"] = 1000.0 * v
    return out


def engram_figures(before: Samples, after: Samples, duration: float) -> dict:
    """The Engram section of a run's result; empty when the target exports none."""
    d = delta(after, before)
    if _total(after, "engram_table_lookups_total") is None:
        return {}
    out: dict = {}
    lookups = _by_label(d, "engram_table_lookups_total", "layer")
    hits = _by_label(d, "engram_cache_hits_total", "layer")
    total_lookups = sum(lookups.values())
    out["lookups"] = total_lookups
    if hits:
        out["cache_hit_rate"] = sum(hits.values()) / total_lookups if total_lookups else 0.0
        out["cache_hit_rate_per_layer"] = {
            layer: (hits.get(layer, 0.0) / n if n else 0.0) for layer, n in lookups.items()
        }
    out.update(_histogram_ms(d, "engram_prefetch_wait_seconds", "prefetch_wait"))
    out.update(_histogram_ms(d, "engram_gather_seconds", "gather"))
    out.update(_histogram_ms(d, "engram_serve_step_seconds", "step"))
    wait_sum = _total(d, "engram_prefetch_wait_seconds_sum")
    step_sum = _total(d, "engram_serve_step_seconds_sum")
    if wait_sum is not None and step_sum:
        out["prefetch_wait_share_of_step"] = wait_sum / step_sum
    for name, key in (("engram_gather_rows_total", "rows_gathered"),
                      ("engram_gather_bytes_total", "bytes_gathered")):
        v = _total(d, name)
        if v is not None:
            out[key] = v
            out[key + "_per_s"] = v / duration if duration > 0 else 0.0
    for name, key, label in (
        ("engram_table_rows_touched_ratio", "utilisation_per_layer", "layer"),
        ("engram_table_bytes", "table_bytes_per_placement", "placement"),
        ("engram_gate_mean", "gate_mean_per_layer", "layer"),
    ):
        vals = _by_label(after, name, label)
        if vals:
            out[key] = vals
    return out


def server_token_counts(before: Samples, after: Samples) -> dict[str, float]:
    """Tokens the server says it processed during the run (a cross-check of usage)."""
    d = delta(after, before)
    out = {}
    for name, key in (("engram_serve_prompt_tokens_total", "prompt_tokens"),
                      ("engram_serve_generation_tokens_total", "generation_tokens")):
        v = _total(d, name)
        if v is not None:
            out[key] = v
    return out
