"""The run summary, with exactly the keys of ``vllm bench serve``'s result JSON.

Definitions match vLLM so numbers are comparable across tools: TPOT is per
request ``(e2el - ttft) / (output_tokens - 1)`` over requests with more than
one output token; ITL pools every inter-chunk gap of every request; throughput
divides by the wall time of the whole run; token totals count successful
requests only; ``std`` is the population standard deviation (numpy's default).
"""
from __future__ import annotations

import numpy as np

from loadtest.client import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p99")

SUMMARY_KEYS = (
    "completed",
    "failed",
    "duration",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
) + tuple(f"{s}_{m}_ms" for m in LATENCY_METRICS for s in STATS)


def _stats_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {s: 0.0 for s in STATS}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "std": float(arr.std()),
        "p99": float(np.percentile(arr, 99)),
    }


def latency_samples(results: list[RequestResult]) -> dict[str, list[float]]:
    """Per-metric samples in seconds, from the successful requests."""
    ok = [r for r in results if r.success]
    return {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }


def summarize(results: list[RequestResult], duration: float) -> dict[str, float | int]:
    """The summary dict (keys in ``SUMMARY_KEYS`` order)."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0, got {duration}")
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, float | int] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }
    for metric, values in latency_samples(results).items():
        for stat, v in _stats_ms(values).items():
            out[f"{stat}_{metric}_ms"] = v
    return out
