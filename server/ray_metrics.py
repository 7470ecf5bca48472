"""A Ray Serve replica's Prometheus metrics, mirrored into Ray's metrics export.

Ray exports every node's metrics on one port (`ray start --metrics-export-port`, which KubeRay's
PodMonitor and Ray's Prometheus service discovery already scrape), while a replica's own /metrics
is reachable only through the proxy, which picks a replica per request. So each replica copies
every sample of its registry, every `interval` seconds, into a `ray.serve.metrics.Gauge` of the
same name, which Ray labels with `deployment`, `replica` and `application`. Ray prefixes the
names with `ray_`: `engram_serve_request_success_total` is exported as
`ray_engram_serve_request_success_total{replica="..."}`. Counters and histogram buckets become
gauges of the same values, so `rate()` and `histogram_quantile()` work on them as before.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from ray.serve.metrics import Gauge

logger = logging.getLogger("engram_serve")


@dataclass
class RegistryMirror:
    interval: float = 5.0  # seconds between copies; Ray's own export runs every few seconds too
    _gauges: dict[str, Gauge] = field(default_factory=dict)

    def publish(self, registry: CollectorRegistry) -> None:
        """Copies one scrape of `registry` (the scrape-time collectors run here, as for /metrics)."""
        for family in registry.collect():
            for sample in family.samples:
                gauge = self._gauges.get(sample.name)
                if gauge is None:
                    gauge = self._gauges[sample.name] = Gauge(sample.name, family.documentation,
                                                              tag_keys=tuple(sorted(sample.labels)))
                gauge.set(sample.value, tags=dict(sample.labels))

    async def run(self, registry: CollectorRegistry) -> None:
        """Publishes until cancelled, off the event loop; a failed copy is logged, not fatal."""
        while True:
            try:
                await asyncio.to_thread(self.publish, registry)
            except Exception:
                logger.exception("copying the metrics to Ray's export failed")
            await asyncio.sleep(self.interval)
