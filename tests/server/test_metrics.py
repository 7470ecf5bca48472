"""/metrics moves exactly as a known workload says it must."""

from __future__ import annotations

import math

from server_metrics import metric, scrape

PROMPTS = [[504, 3575, 282], [504, 3575, 282, 4649], [504, 3575, 282, 4649, 314]]
MAX_TOKENS = 5
HEADS_TOTAL = 16  # default layout: orders 2 and 3, 8 heads each
LAYERS = ("1", "15")


def test_metrics_after_known_workload(http):
    before = scrape(http)
    for ids in PROMPTS:
        r = http.post("/v1/completions", json={"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0,
                                               "ignore_eos": True})
        assert r.status_code == 200
    after = scrape(http)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    n = len(PROMPTS)
    prompt_tokens = sum(map(len, PROMPTS))
    assert delta("engram_serve_prompt_tokens_total") == prompt_tokens
    assert delta("engram_serve_generation_tokens_total") == n * MAX_TOKENS
    assert delta("engram_serve_request_success_total", finished_reason="length") == n
    assert delta("engram_serve_request_success_total", finished_reason="stop") == 0
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(f"engram_serve_{hist}_count") == n
    assert delta("engram_serve_inter_token_latency_seconds_count") == n * (MAX_TOKENS - 1)
    ttft, e2e = delta("engram_serve_time_to_first_token_seconds_sum"), delta("engram_serve_e2e_request_latency_seconds_sum")
    assert 0 < ttft < e2e
    # vLLM's bucket layout, cumulative: +Inf holds every observation
    assert delta("engram_serve_time_to_first_token_seconds_bucket", le="+Inf") == n
    assert delta("engram_serve_time_to_first_token_seconds_bucket", le="2560.0") == n
    assert delta("engram_serve_step_seconds_count") >= MAX_TOKENS
    assert metric(after, "engram_serve_num_requests_running") == 0
    assert metric(after, "engram_serve_kv_cache_usage_perc") == 0

    # Engram tables: every token that went through the model looked up HEADS_TOTAL rows per layer.
    forwarded = prompt_tokens + n * (MAX_TOKENS - 1)  # the last sampled token is never fed back
    for layer in LAYERS:
        assert delta("engram_table_lookups_total", layer=layer) == forwarded * HEADS_TOTAL
        assert delta("engram_cache_hits_total", layer=layer) == 0  # no --cache-rows
        rows = delta("engram_gather_rows_total", layer=layer)
        assert 0 < rows <= forwarded * HEADS_TOTAL
        assert delta("engram_gather_bytes_total", layer=layer) == rows * 64 * 4  # float32 rows of 64
        assert delta("engram_gather_seconds_count", layer=layer) >= 1
        assert delta("engram_prefetch_wait_seconds_count", layer=layer) >= 1
        assert 0 < metric(after, "engram_table_rows_touched_ratio", layer=layer) < 1
        assert metric(after, "engram_table_bytes", layer=layer, placement="host") > 0
        gate = metric(after, "engram_gate_mean", layer=layer)
        assert 0 < gate < 1 and not math.isnan(gate)
