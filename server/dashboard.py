"""The live page at /dashboard: the server's key figures as charts, no Grafana needed.

The server samples its own Prometheus registry every few seconds (a task in the app's
lifespan) into a short ring buffer, so a freshly opened page shows the last minutes at
once. /dashboard/data turns that history into ready-to-draw series with the same
arithmetic the Grafana dashboard asks of Prometheus: `rate()` of counters between
samples, `histogram_quantile()` over bucket deltas of a short window, gauges as read.
The page (server/static/dashboard.html + .js) only draws what it is given.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse

from loadtest.promql import histogram_quantile

STATIC = Path(__file__).resolve().parent / "static"
SAMPLE_INTERVAL = 2.0      # seconds between two samples of the registry
HISTORY_SECONDS = 300.0    # what the page shows
QUANTILE_WINDOW = 5        # samples (10 s) of bucket deltas behind each percentile point

# A sample: {sample name: [(labels, value), ...]}, only the families the page draws; indexed
# by name because every chart point looks up a few names in each of ~150 samples.
Sample = dict[str, list[tuple[dict[str, str], float]]]


def read_registry(registry) -> Sample:
    """The engram_* and engram_serve_* samples of a prometheus_client registry."""
    out: Sample = {}
    for family in registry.collect():
        if family.name.startswith("engram_"):
            for s in family.samples:
                out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _select(sample: Sample, name: str, by: str | None) -> dict[str, float]:
    """Sum of the samples of `name`, grouped by the value of label `by` ('' when by is None)."""
    groups: dict[str, float] = {}
    for labels, value in sample.get(name, ()):
        key = labels.get(by, "") if by else ""
        groups[key] = groups.get(key, 0.0) + value
    return groups


@dataclass
class History:
    """Ring buffer of registry samples; every derived series is computed from it on request."""
    max_samples: int = int(HISTORY_SECONDS / SAMPLE_INTERVAL) + QUANTILE_WINDOW + 1
    times: deque = field(default_factory=deque)
    samples: deque = field(default_factory=deque)

    def add(self, t: float, sample: Sample) -> None:
        self.times.append(t)
        self.samples.append(sample)
        while len(self.times) > self.max_samples:
            self.times.popleft()
            self.samples.popleft()

    def rate(self, name: str, by: str | None = None) -> dict[str, list[float | None]]:
        """Per-second increase of a counter between consecutive samples, per label value."""
        t, s = list(self.times), list(self.samples)
        keys = sorted({k for x in s for k in _select(x, name, by)})
        out: dict[str, list[float | None]] = {k: [] for k in keys}
        for i in range(1, len(s)):
            prev, cur = _select(s[i - 1], name, by), _select(s[i], name, by)
            for k in keys:
                if k in prev and k in cur and t[i] > t[i - 1]:
                    out[k].append(max(0.0, cur[k] - prev[k]) / (t[i] - t[i - 1]))  # a reset counts as 0
                else:
                    out[k].append(None)
        return out

    def gauge(self, name: str, by: str | None = None) -> dict[str, list[float | None]]:
        """A gauge's value (summed over other labels) at each sample after the first, per label value."""
        selected = [_select(x, name, by) for x in list(self.samples)[1:]]
        keys = sorted({k for x in selected for k in x})
        return {k: [x.get(k) for x in selected] for k in keys}

    def quantiles(self, name: str, qs: tuple[float, ...] = (0.5, 0.99), by: str | None = None
                  ) -> dict[float, dict[str, list[float | None]]]:
        """histogram_quantile(q, increase(name_bucket[window])) at each sample, per q and label value."""
        per_sample = [self._buckets(x, name + "_bucket", by) for x in self.samples]
        keys = sorted({k for b in per_sample for k in b})
        out: dict[float, dict[str, list[float | None]]] = {q: {k: [] for k in keys} for q in qs}
        for i in range(1, len(per_sample)):
            old = per_sample[max(0, i - QUANTILE_WINDOW)]
            for k in keys:
                cur, before = per_sample[i].get(k, {}), old.get(k, {})
                delta = {le: cur[le] - before.get(le, 0.0) for le in cur}
                for q in qs:
                    out[q][k].append(histogram_quantile(q, delta))
        return out

    @staticmethod
    def _buckets(sample: Sample, bucket_name: str, by: str | None) -> dict[str, dict[float, float]]:
        out: dict[str, dict[float, float]] = {}
        for labels, value in sample.get(bucket_name, ()):
            group = out.setdefault(labels.get(by, "") if by else "", {})
            le = float(labels["le"])
            group[le] = group.get(le, 0.0) + value
        return out


def _series(named: dict[str, list], label: str = "{}") -> list[dict]:
    """Chart lines; non-finite values become gaps (JSON has no NaN)."""
    return [{"name": label.format(k), "values": [v if v is not None and math.isfinite(v) else None for v in vals]}
            for k, vals in named.items()]


def _chart(cid: str, title: str, unit: str, group: str, *series: list[dict]) -> dict:
    return {"id": cid, "title": title, "unit": unit, "group": group, "series": [x for s in series for x in s]}


def charts(h: History) -> list[dict]:
    """The page's charts; the same figures as the Grafana dashboard (docker/grafana)."""
    p = "engram_serve_"

    def pct(name: str, prefix: str = "") -> list[dict]:
        by_q = h.quantiles(name)
        return _series(by_q[0.5], prefix + "p50") + _series(by_q[0.99], prefix + "p99")

    return [
        _chart("throughput", "Token throughput", "tok/s", "serving",
               _series(h.rate(p + "generation_tokens_total"), "generation"),
               _series(h.rate(p + "prompt_tokens_total"), "prompt")),
        _chart("requests", "Finished requests by reason", "req/s", "serving",
               _series(h.rate(p + "request_success_total", "finished_reason"))),
        _chart("running", "Running and waiting requests", "", "serving",
               _series(h.gauge(p + "num_requests_running"), "running"),
               _series(h.gauge(p + "num_requests_waiting"), "waiting")),
        _chart("kv", "KV cache usage", "ratio", "serving", _series(h.gauge(p + "kv_cache_usage_perc"), "KV cache")),
        _chart("ttft", "Time to first token", "s", "serving", pct(p + "time_to_first_token_seconds")),
        _chart("itl", "Inter-token latency", "s", "serving", pct(p + "inter_token_latency_seconds")),
        _chart("e2e", "E2E request latency", "s", "serving", pct(p + "e2e_request_latency_seconds")),
        _chart("queue", "Queue time", "s", "serving", pct(p + "request_queue_time_seconds")),
        _chart("wait", "Prefetch wait vs step time", "s", "engram",
               pct("engram_prefetch_wait_seconds", "wait "), pct(p + "step_seconds", "step ")),
        _chart("hits", "Hot-row cache hit rate", "ratio", "engram", _hit_rate(h)),
        _chart("rows", "Rows gathered", "rows/s", "engram",
               _series(h.rate("engram_gather_rows_total", "layer"), "layer {}")),
        _chart("bytes", "Bytes gathered", "B/s", "engram",
               _series(h.rate("engram_gather_bytes_total", "layer"), "layer {}")),
        _chart("touched", "Table utilisation (rows touched)", "ratio", "engram",
               _series(h.gauge("engram_table_rows_touched_ratio", "layer"), "layer {}")),
        _chart("gate", "Mean gate per layer", "", "engram", _series(h.gauge("engram_gate_mean", "layer"), "layer {}")),
    ]


def _hit_rate(h: History) -> list[dict]:
    hits, lookups = h.rate("engram_cache_hits_total", "layer"), h.rate("engram_table_lookups_total", "layer")
    ratio = {k: [None if hv is None or not lv else hv / lv for hv, lv in zip(hits.get(k, []), rates)]
             for k, rates in lookups.items()}
    return _series(ratio, "layer {}")


def table_bytes(sample: Sample) -> dict[str, float]:
    """Bytes of all Engram tables per placement tier, from the newest sample."""
    return _select(sample, "engram_table_bytes", "placement")


def _registry(app: FastAPI):
    metrics = getattr(app.state.client, "metrics", None)
    return metrics.registry if metrics is not None else None


@asynccontextmanager
async def _sampling(app: FastAPI):
    """Sample the app's registry while the app runs (starts empty until the model has loaded)."""
    app.state.dashboard_history = history = History()

    async def loop() -> None:
        while True:
            registry = _registry(app)
            if registry is not None:
                history.add(time.time(), read_registry(registry))
            await asyncio.sleep(SAMPLE_INTERVAL)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()


router = APIRouter(lifespan=_sampling, include_in_schema=False)


@router.get("/dashboard")
async def dashboard_page() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html")


@router.get("/dashboard/dashboard.js")
async def dashboard_script() -> FileResponse:
    return FileResponse(STATIC / "dashboard.js", media_type="text/javascript")


@router.get("/dashboard/data")
async def dashboard_data(request: Request) -> dict:
    """Everything the page draws: sample times, charts, and the latest table bytes."""
    history: History = request.app.state.dashboard_history
    client = request.app.state.client
    # A frozen copy, so the charts (tens of ms of Python) run off the event loop while it samples on.
    frozen = replace(history, times=deque(history.times), samples=deque(history.samples))
    return {
        "model": client.model_name if client.metrics is not None else None,
        "state": client.state.value,
        "interval": SAMPLE_INTERVAL,
        "times": list(frozen.times)[1:],
        "charts": await asyncio.to_thread(charts, frozen) if len(frozen.times) > 1 else [],
        "table_bytes": table_bytes(frozen.samples[-1]) if frozen.samples else {},
    }
