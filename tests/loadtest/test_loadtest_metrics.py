"""Summary statistics and /metrics figures on inputs whose answers are known."""
from __future__ import annotations

import pytest

from loadtest.client import RequestResult
from loadtest.metrics import SUMMARY_KEYS, summarize
from loadtest.promql import histogram_quantile
from loadtest.scrape import engram_figures, parse_metrics


def test_summary_matches_vllm_definitions():
    ok1 = RequestResult(success=True, prompt_len=10, output_tokens=3, ttft=0.1,
                        itl=[0.02, 0.04], latency=0.16)
    ok2 = RequestResult(success=True, prompt_len=20, output_tokens=1, ttft=0.3, latency=0.3)
    bad = RequestResult(success=False, prompt_len=99, output_tokens=50, error="boom")
    s = summarize([ok1, ok2, bad], duration=2.0)
    assert tuple(s) == SUMMARY_KEYS
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 4  # failures excluded
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(2.0)
    assert s["total_token_throughput"] == pytest.approx(17.0)
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["std_ttft_ms"] == pytest.approx(100.0)
    # TPOT only for requests with > 1 output token: (0.16 - 0.1) / 2
    assert s["mean_tpot_ms"] == pytest.approx(30.0) and s["std_tpot_ms"] == 0.0
    assert s["mean_itl_ms"] == pytest.approx(30.0) and s["median_itl_ms"] == pytest.approx(30.0)
    assert s["p99_itl_ms"] == pytest.approx(39.8)
    assert s["median_e2el_ms"] == pytest.approx(230.0)


def test_summary_of_all_failed_is_zeros_not_nan():
    s = summarize([RequestResult(error="x")], duration=1.0)
    assert s["completed"] == 0 and s["failed"] == 1 and s["mean_ttft_ms"] == 0.0


def test_histogram_quantile_like_promql():
    # 10 observations in (0, 1], 10 in (1, 2], none above: p50 = 1.0, p75 = 1.5
    buckets = {1.0: 10, 2.0: 20, float("inf"): 20}
    assert histogram_quantile(0.5, buckets) == pytest.approx(1.0)
    assert histogram_quantile(0.75, buckets) == pytest.approx(1.5)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.5)
    # everything above the last finite bound: the bound itself
    assert histogram_quantile(0.99, {1.0: 0, float("inf"): 5}) == 1.0
    assert histogram_quantile(0.5, {1.0: 0, float("inf"): 0}) is None


BEFORE = """
# TYPE engram_table_lookups counter
engram_table_lookups_total{layer="1"} 100
engram_table_lookups_total{layer="15"} 100
# TYPE engram_cache_hits counter
engram_cache_hits_total{layer="1"} 50
engram_cache_hits_total{layer="15"} 0
# TYPE engram_prefetch_wait_seconds histogram
engram_prefetch_wait_seconds_bucket{layer="1",le="0.001"} 5
engram_prefetch_wait_seconds_bucket{layer="1",le="0.01"} 5
engram_prefetch_wait_seconds_bucket{layer="1",le="+Inf"} 5
engram_prefetch_wait_seconds_count{layer="1"} 5
engram_prefetch_wait_seconds_sum{layer="1"} 0.002
# TYPE engram_gather_bytes counter
engram_gather_bytes_total{layer="1"} 1000
# TYPE engram_table_rows_touched_ratio gauge
engram_table_rows_touched_ratio{layer="1"} 0.1
"""
AFTER = """
# TYPE engram_table_lookups counter
engram_table_lookups_total{layer="1"} 300
engram_table_lookups_total{layer="15"} 300
# TYPE engram_cache_hits counter
engram_cache_hits_total{layer="1"} 250
engram_cache_hits_total{layer="15"} 100
# TYPE engram_prefetch_wait_seconds histogram
engram_prefetch_wait_seconds_bucket{layer="1",le="0.001"} 5
engram_prefetch_wait_seconds_bucket{layer="1",le="0.01"} 105
engram_prefetch_wait_seconds_bucket{layer="1",le="+Inf"} 105
engram_prefetch_wait_seconds_count{layer="1"} 105
engram_prefetch_wait_seconds_sum{layer="1"} 0.502
# TYPE engram_gather_bytes counter
engram_gather_bytes_total{layer="1"} 5000
# TYPE engram_table_rows_touched_ratio gauge
engram_table_rows_touched_ratio{layer="1"} 0.4
"""


def test_engram_figures_cover_only_the_run():
    f = engram_figures(parse_metrics(BEFORE), parse_metrics(AFTER), duration=2.0)
    assert f["lookups"] == 400
    assert f["cache_hit_rate"] == pytest.approx(300 / 400)
    assert f["cache_hit_rate_per_layer"] == {"1": 1.0, "15": 0.5}
    # the 100 new waits all fall in (1 ms, 10 ms]: p50 interpolates to 5.5 ms
    assert f["prefetch_wait_p50_ms"] == pytest.approx(5.5)
    assert f["prefetch_wait_mean_ms"] == pytest.approx(5.0)
    assert f["bytes_gathered"] == 4000 and f["bytes_gathered_per_s"] == 2000
    assert f["utilisation_per_layer"] == {"1": 0.4}


def test_no_engram_metrics_no_section():
    assert engram_figures(parse_metrics(""), parse_metrics("# TYPE x counter\nx_total 1\n"), 1.0) == {}
