"""Runs and comparisons against a fake server with a known time per token: fast and
deterministic checks of the runner, schedule, failure handling and compare's output."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from loadtest.compare import CompareConfig, Variant, run_compare
from loadtest.metrics import SUMMARY_KEYS
from loadtest.process import ServerProcess
from loadtest.runner import RunConfig, TargetError, run
from loadtest.scrape import parse_metrics
from loadtest.workload import WorkloadConfig, build_requests

REPO = Path(__file__).resolve().parents[2]


def _server_tokens(base_url: str) -> tuple[float, float]:
    s = parse_metrics(httpx.get(base_url + "/metrics").text)
    get = lambda name: sum(v for (n, _), v in s.items() if n == name)  # noqa: E731
    return get("engram_serve_prompt_tokens_total"), get("engram_serve_generation_tokens_total")


def test_run_counts_match_server_usage_and_metrics(fake_server):
    before = _server_tokens(fake_server.base_url)
    reqs = build_requests(WorkloadConfig(num_prompts=12, input_len=20, output_len=6, seed=2))
    res = run(RunConfig(base_url=fake_server.base_url, max_concurrency=4, progress=False,
                        warmup_requests=3), reqs)
    after = _server_tokens(fake_server.base_url)
    # 3 warm-up requests shaped like the workload reached the server but not the figures
    assert after[0] - before[0] == 15 * 20 and after[1] - before[1] == 15 * 6
    assert set(SUMMARY_KEYS) <= set(res)
    assert res["completed"] == 12 and res["failed"] == 0 and res["model_id"] == "fake-model"
    assert res["total_input_tokens"] == 12 * 20 and res["total_output_tokens"] == 12 * 6
    assert res["server_tokens"] == {"prompt_tokens": 240, "generation_tokens": 72}
    assert all(len(itl) == 5 for itl in res["itls"])
    # 5 ms per token: TPOT cannot be below it, and ITL is about it
    assert 5.0 <= res["mean_tpot_ms"] < 50.0 and 4.0 <= res["median_itl_ms"] < 50.0
    assert res["mean_e2el_ms"] >= 30.0 and 0 < res["mean_ttft_ms"] < res["mean_e2el_ms"]
    assert res["output_throughput"] == pytest.approx(72 / res["duration"])
    eg = res["engram"]
    assert eg["cache_hit_rate"] == pytest.approx(0.5) and eg["lookups"] == 2 * 16 * (240 + 72)
    assert eg["prefetch_wait_p99_ms"] > 0 and eg["utilisation_per_layer"] == {"1": 0.25, "15": 0.25}


def test_requests_leave_on_the_poisson_schedule(fake_server):
    rate, n = 40.0, 120
    reqs = build_requests(WorkloadConfig(num_prompts=n, input_len=4, output_len=2, seed=5))
    res = run(RunConfig(base_url=fake_server.base_url, request_rate=rate, seed=5,
                        progress=False, scrape=False), reqs)
    assert res["completed"] == n
    sent = np.sort(np.array(res["start_times"]))
    lag = sent - np.array(res["scheduled_times"])
    assert np.median(lag) < 0.02 and lag.max() < 0.5  # sent when scheduled
    # the realised mean rate is the requested one (n = 120 exponential gaps:
    # relative standard error 9%; 30% is > 3 sigma, and the seed is fixed)
    assert abs((n - 1) / (sent[-1] - sent[0]) - rate) / rate < 0.3


def test_max_concurrency_bounds_requests_in_flight(fake_server):
    reqs = build_requests(WorkloadConfig(num_prompts=8, input_len=4, output_len=10))
    res = run(RunConfig(base_url=fake_server.base_url, max_concurrency=2, progress=False,
                        scrape=False), reqs)
    starts = np.array(res["start_times"])
    ends = starts + np.array(res["ttfts"]) + np.array([sum(x) for x in res["itls"]])
    in_flight = max(int(((starts <= t) & (ends > t)).sum()) for t in starts)
    assert res["completed"] == 8 and in_flight <= 2


def _kill_after_first_request(srv: ServerProcess, tokens: int) -> None:
    while _server_tokens(srv.base_url)[1] < tokens:
        time.sleep(0.02)
    srv.signal(signal.SIGKILL)  # a crash


def test_killed_server_counts_failures_not_a_crash(tmp_path, fake_cmd):
    srv = ServerProcess(fake_cmd(token_delay=0.01), tmp_path / "s.log", startup_timeout=60)
    srv.start()
    try:
        reqs = build_requests(WorkloadConfig(num_prompts=16, input_len=4, output_len=60))
        # 4 at a time, 0.6 s each: kill as soon as the first request has finished,
        # so others are mid-stream and the rest still queued
        threading.Thread(target=_kill_after_first_request, args=(srv, 60), daemon=True).start()
        res = run(RunConfig(base_url=srv.base_url, model="fake-model", max_concurrency=4,
                            progress=False), reqs)
    finally:
        srv.stop()
    assert res["completed"] + res["failed"] == 16
    assert 1 <= res["completed"] < 16 and res["failed"] >= 4
    assert all(e for e, n in zip(res["errors"], res["output_lens"]) if n == 0)
    assert "engram" not in res  # no /metrics after the kill: no section, no crash


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(TargetError, match="is the server up"):
        run(RunConfig(base_url="http://127.0.0.1:9", progress=False),
            build_requests(WorkloadConfig(num_prompts=1)))


def test_cli_run_writes_result_json(fake_server, tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "loadtest", "run", "--base-url", fake_server.base_url,
           "--dataset", "builtin", "--num-prompts", "5", "--output-len", "4",
           "--request-rate", "50", "--no-progress", "--result-file", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Serving Benchmark Result" in done.stdout and "Cache hit rate" in done.stdout
    res = json.loads(out.read_text())
    assert res["completed"] == 5 and res["total_output_tokens"] == 20
    assert res["total_input_tokens"] > 5 and res["request_rate"] == 50.0


def test_cli_bad_dataset_exits_2_with_message(tmp_path):
    cmd = [sys.executable, "-m", "loadtest", "run", "--dataset", str(tmp_path / "nope.txt")]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "dataset file not found" in done.stderr
    assert "Traceback" not in done.stderr


def test_compare_ratios_and_outputs(tmp_path, fake_cmd):
    # base: 10 ms per token; 'slow' is the fake server without prefetch: 20 ms per token
    cfg = CompareConfig(
        variants=[Variant("base", ["--engram", "x"]),
                  Variant("slow", ["--engram", "x", "--no-prefetch"])],
        server_cmd=fake_cmd(token_delay=0.01), out_dir=tmp_path, rounds=2,
        startup_timeout=60,
    )
    reqs = build_requests(WorkloadConfig(num_prompts=6, input_len=4, output_len=8))
    cmp = run_compare(cfg, reqs, {"max_concurrency": 3, "progress": False})
    s = cmp["summary"]
    assert s["base"]["ratio"]["output_throughput"]["median"] == 1.0
    tpot = s["slow"]["ratio"]["mean_tpot_ms"]
    assert len(tpot["rounds"]) == 2 and 1.4 < tpot["median"] < 2.6
    assert 0.35 < s["slow"]["ratio"]["output_throughput"]["median"] < 0.8
    assert s["slow"]["engram"]["cache_hit_rate"]["median"] == pytest.approx(0.5)
    assert (tmp_path / "logs" / "base.log").is_file()


def test_cli_compare_writes_json_table_and_plots(tmp_path, fake_cmd):
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "loadtest", "compare", "--server-cmd", " ".join(fake_cmd(0.002)),
           "--variant", "base=--no-engram", "--variant", "eng=--engram x", "--rounds", "2",
           "--num-prompts", "4", "--output-len", "4", "--no-progress", "--out-dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    cmp = json.loads((out / "compare.json").read_text())
    assert cmp["base"] == "base" and cmp["rounds"] == 2 and cmp["workload"]["warmup_requests"] == 4
    assert [len(cmp["runs"][v]) for v in ("base", "eng")] == [2, 2]
    table = (out / "compare.md").read_text()
    assert "| `eng` |" in table and "| `base` | " in table and table.strip() in done.stdout
    for png in ("throughput_ratio.png", "latency.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
