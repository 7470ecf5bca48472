"""Prometheus metrics of the server, with vLLM's names (prefix `engram_serve_`), meaning and buckets.

Three kinds of sources feed them:
- per request, from the engine's `RequestOutput` deltas (`RequestTracker`, called on the
  engine thread right when a token is delivered, so latencies are not skewed by the event
  loop): token counters, TTFT, inter-token latency, E2E, queue time, finish reasons and
  the per-layer Engram gate values;
- per table, from offload's `TableStats`: counters, gauges and the gather and wait histograms
  are read from `snapshot()` at scrape time, so they are never stale and cost nothing between
  scrapes (the native prefetch worker counts its own, off the engine thread's Python);
- the engine's own `stats()` (running / waiting requests, KV usage), also read at scrape time.
Without Engram the engram_* families are exported with no samples.
Each app has its own registry, so two apps in one process never collide.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
# Ours: an engine step is milliseconds to a second on CPU.
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0]
GATE_WINDOW = 1024  # engram_gate_mean averages the gates of this many most recent generated tokens


class GateWindow:
    """Mean gate per Engram layer over the most recent generated tokens (thread-safe)."""

    def __init__(self, size: int = GATE_WINDOW):
        self._size = size
        self._values: dict[int, deque] = {}
        self._lock = threading.Lock()

    def add(self, gates: Iterable[dict[int, float]]) -> None:
        with self._lock:
            for token_gates in gates:
                for layer_id, value in token_gates.items():
                    self._values.setdefault(int(layer_id), deque(maxlen=self._size)).append(float(value))

    def means(self) -> dict[int, float]:
        with self._lock:
            return {layer: sum(v) / len(v) for layer, v in self._values.items() if v}


class _ScrapeTimeCollector(Collector):
    """Gauges and counters read from the engine when /metrics is scraped."""

    def __init__(self, metrics: "ServerMetrics"):
        self._m = metrics

    def collect(self):
        m = self._m
        labels = [m.model_name]
        running = GaugeMetricFamily("engram_serve_num_requests_running",
                                    "Number of requests in the engine's running batch.", labels=["model_name"])
        waiting = GaugeMetricFamily("engram_serve_num_requests_waiting",
                                    "Number of requests waiting to be scheduled.", labels=["model_name"])
        kv = GaugeMetricFamily("engram_serve_kv_cache_usage_perc",
                               "KV-cache usage, 1 means 100 percent.", labels=["model_name"])
        stats = m.engine_stats()
        if stats is not None:
            running.add_metric(labels, float(getattr(stats, "num_running", 0)))
            waiting.add_metric(labels, float(getattr(stats, "num_waiting", 0)))
            kv.add_metric(labels, float(getattr(stats, "kv_cache_usage", 0.0)))
        yield from (running, waiting, kv)
        yield from self._tables(m.table_snapshot() or {})
        gate = GaugeMetricFamily("engram_gate_mean", f"Mean Engram gate value over the last {GATE_WINDOW} "
                                 "generated tokens, per layer.", labels=["layer"])
        for layer, value in sorted(m.gates.means().items()):
            gate.add_metric([str(layer)], value)
        yield gate

    @staticmethod
    def _tables(snapshot: dict) -> Iterable:
        families = {
            "lookups": CounterMetricFamily("engram_table_lookups", "Engram table row lookups (tokens x heads).",
                                           labels=["layer"]),
            "cache_hits": CounterMetricFamily("engram_cache_hits", "Lookups served by the hot-row cache; "
                                              "hit rate = rate(hits) / rate(lookups).", labels=["layer"]),
            "rows_gathered": CounterMetricFamily("engram_gather_rows", "Rows read from the table's own tier "
                                                 "(cache misses; deduplicated per step in front of mmap or a "
                                                 "cache).", labels=["layer"]),
            "bytes_gathered": CounterMetricFamily("engram_gather_bytes", "Bytes read from the table's own tier.",
                                                  labels=["layer"]),
        }
        touched = GaugeMetricFamily("engram_table_rows_touched_ratio",
                                    "Share of the table's rows read at least once since start.", labels=["layer"])
        table_bytes = GaugeMetricFamily("engram_table_bytes", "Bytes of the table held per placement tier "
                                        "(device: GPU memory, host, host_pinned: page-locked for a GPU, mmap; "
                                        "cache = the hot-row cache).",
                                        labels=["layer", "placement"])
        for layer_id, s in sorted(snapshot.items()):
            layer = str(layer_id)
            for key, family in families.items():
                family.add_metric([layer], float(s.get(key, 0)))
            touched.add_metric([layer], float(s.get("rows_touched_ratio", 0.0)))
            for placement, nbytes in sorted(s.get("table_bytes", {}).items()):
                table_bytes.add_metric([layer, placement], float(nbytes))
        yield from families.values()
        yield from (touched, table_bytes)
        for kind, name, doc in (("wait", "engram_prefetch_wait_seconds", "Time the forward waited for an Engram "
                                 "layer's rows."),
                                ("gather", "engram_gather_seconds", "Time one gather of an Engram layer's rows took.")):
            family = HistogramMetricFamily(name, doc, labels=["layer"])
            for layer_id, s in sorted(snapshot.items()):
                buckets = [(floatToGoString(le), count) for le, count in s[f"{kind}_seconds_buckets"]]
                family.add_metric([str(layer_id)], buckets, s[f"{kind}_seconds_total"])
            yield family


class ServerMetrics:
    """Every metric of one server; `engine_stats` / `table_snapshot` are read at scrape time."""

    def __init__(self, model_name: str, engine_stats: Callable[[], object | None],
                 table_snapshot: Callable[[], dict | None]):
        self.model_name = model_name
        self.engine_stats = engine_stats
        self.table_snapshot = table_snapshot
        self.gates = GateWindow()
        disable_created_metrics()  # like vLLM: no *_created series next to every counter
        self.registry = r = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=r)
        mn = ["model_name"]
        self.prompt_tokens = Counter("engram_serve_prompt_tokens", "Number of prefill tokens processed.",
                                     mn, registry=r).labels(model_name)
        self.generation_tokens = Counter("engram_serve_generation_tokens", "Number of generation tokens "
                                         "processed.", mn, registry=r).labels(model_name)
        self._success = Counter("engram_serve_request_success", "Count of finished requests by finish "
                                "reason (stop, length, abort, error).", mn + ["finished_reason"], registry=r)
        self.ttft = Histogram("engram_serve_time_to_first_token_seconds", "Histogram of time to first token "
                              "in seconds.", mn, buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("engram_serve_inter_token_latency_seconds", "Histogram of inter-token latency in "
                             "seconds.", mn, buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("engram_serve_e2e_request_latency_seconds", "Histogram of e2e request latency in "
                             "seconds.", mn, buckets=REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram("engram_serve_request_queue_time_seconds", "Histogram of time spent in "
                                    "WAITING phase for request.", mn, buckets=REQUEST_LATENCY_BUCKETS,
                                    registry=r).labels(model_name)
        self.step = Histogram("engram_serve_step_seconds", "Histogram of engine step time (schedule, forward, "
                              "sample) in seconds.", mn, buckets=STEP_BUCKETS, registry=r).labels(model_name)
        r.register(_ScrapeTimeCollector(self))

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def track(self) -> "RequestTracker":
        return RequestTracker(self)


class RequestTracker:
    """Feeds one engine request's deltas into the metrics; `finish` counts a request once."""

    def __init__(self, metrics: ServerMetrics):
        self._m = metrics
        self._start = time.monotonic()
        self._last_token: float | None = None
        self._done = False
        self._lock = threading.Lock()

    def observe(self, out) -> None:
        now = time.monotonic()
        m = self._m
        if out.new_token_ids:
            m.generation_tokens.inc(len(out.new_token_ids))
            if self._last_token is None:
                m.prompt_tokens.inc(out.num_prompt_tokens)
                m.ttft.observe(max(0.0, (out.first_token_time or now) - (out.arrival_time or self._start)))
            else:
                m.itl.observe(now - self._last_token)
            self._last_token = now
        if out.gates:
            m.gates.add(out.gates)
        if out.finished:
            if out.first_scheduled_time is not None and out.arrival_time is not None:
                m.queue_time.observe(max(0.0, out.first_scheduled_time - out.arrival_time))
            self.finish(out.finish_reason or "stop", out.arrival_time)

    def finish(self, reason: str, arrival_time: float | None = None) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        self._m.finished(reason)
        self._m.e2e.observe(time.monotonic() - (arrival_time or self._start))
