"""PromQL's `histogram_quantile`, for reading Prometheus histograms without a Prometheus.

The load tester owns it: reading a target's /metrics as a Grafana panel would is its job
(loadtest.scrape). The server's live dashboard uses it on its own registry; the server may
import loadtest, the reverse is what the architecture contract forbids."""
from __future__ import annotations

import math


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's estimate from cumulative bucket counts {upper bound: count}: linear
    interpolation inside the bucket holding rank q * total; a rank in the +Inf bucket gives
    the highest finite bound. None without a +Inf bucket or without observations (where
    Prometheus gives NaN)."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf or buckets[math.inf] <= 0:
        return None
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if upper == math.inf:
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None
