"""The load tester against the real engram-serve (SmolLM2 + a tiny Engram checkpoint) on
loopback.  Slow: a server start loads the model (seconds on a quiet machine, minutes on
a busy one).  The kill test is last: it ends the module's shared server."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from loadtest.checkpoints import create_checkpoint, vocab_for_table_gb
from loadtest.compare import CompareConfig, Variant, run_compare
from loadtest.metrics import SUMMARY_KEYS
from loadtest.plots import latency_plot, throughput_ratio_plot
from loadtest.process import ServerProcess, engram_serve_cmd
from loadtest.report import compare_markdown
from loadtest.runner import RunConfig, run
from loadtest.scrape import parse_metrics
from loadtest.workload import WorkloadConfig, build_requests

pytestmark = pytest.mark.slow
SERVER_ARGS = ["--max-num-seqs", "8", "--log-level", "warning"]


TINY_GB = 0.005


@pytest.fixture(scope="module")
def tiny_engram(tmp_path_factory):
    """A real Engram checkpoint of 5 MB of tables, made by engram-init."""
    return create_checkpoint(tmp_path_factory.mktemp("ckpt"), vocab_for_table_gb(TINY_GB), "bfloat16")


@pytest.fixture(scope="module")
def real_server(tmp_path_factory, tiny_engram):
    log = tmp_path_factory.mktemp("real") / "server.log"
    cmd = engram_serve_cmd() + SERVER_ARGS + ["--engram", str(tiny_engram), "--cache-rows", "512"]
    with ServerProcess(cmd, log, startup_timeout=600) as srv:
        yield srv


def _count(base_url: str, name: str) -> float:
    s = parse_metrics(httpx.get(base_url + "/metrics").text)
    return sum(v for (n, _), v in s.items() if n == name)


def test_table_gb_gives_tables_of_that_size(tiny_engram):
    tables = json.loads((tiny_engram / "engram.json").read_text())["tables"]
    assert sorted(tables, key=int) == ["1", "15"]
    total = sum(t["nbytes"] for t in tables.values())
    # rows per head are primes just above engram_vocab_size: a little over, never under
    assert TINY_GB * 1e9 <= total <= 1.1 * TINY_GB * 1e9


def test_short_run_complete_and_counts_match_usage(real_server):
    reqs = build_requests(WorkloadConfig(num_prompts=6, input_len=24, output_len=8, seed=1))
    reqs += build_requests(WorkloadConfig(dataset="builtin", num_prompts=2, output_len=8))
    res = run(RunConfig(base_url=real_server.base_url, max_concurrency=4, request_rate=20.0,
                        progress=False), reqs)
    assert set(SUMMARY_KEYS) <= set(res) and res["failed"] == 0, res["errors"]
    assert res["completed"] == 8
    # ignore_eos: every request yields exactly max_tokens, as the server's usage says
    assert res["output_lens"] == [8] * 8 and res["total_output_tokens"] == 64
    # token-id prompts: the server's prompt_tokens is the exact length we sent
    assert res["input_lens"][:6] == [24] * 6 and all(n > 2 for n in res["input_lens"][6:])
    assert res["server_tokens"] == {"prompt_tokens": res["total_input_tokens"],
                                    "generation_tokens": 64}
    assert 0 < res["mean_ttft_ms"] < res["mean_e2el_ms"] and res["mean_tpot_ms"] > 0
    assert 0 < res["output_throughput"] < 10_000
    eg = res["engram"]
    assert eg["lookups"] > 0 and 0.0 <= eg["cache_hit_rate"] <= 1.0
    assert set(eg["utilisation_per_layer"]) == {"1", "15"}
    assert all(0 < u <= 1 for u in eg["utilisation_per_layer"].values())


def test_killed_server_counted_as_failures(real_server):
    """Last in the module: it ends the shared server."""
    reqs = build_requests(WorkloadConfig(num_prompts=8, input_len=8, output_len=200, seed=2))
    first = _count(real_server.base_url, "engram_serve_time_to_first_token_seconds_count")

    def kill_when_streaming() -> None:
        """Kill once a first token has gone out (TTFT observed), so streams are cut mid-way."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if _count(real_server.base_url, "engram_serve_time_to_first_token_seconds_count") > first:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        time.sleep(0.5)
        real_server.signal(signal.SIGKILL)  # a crash

    threading.Thread(target=kill_when_streaming, daemon=True).start()
    res = run(RunConfig(base_url=real_server.base_url, max_concurrency=2, progress=False,
                        timeout=120), reqs)
    assert res["completed"] + res["failed"] == 8 and res["failed"] >= 6
    assert all(res["errors"][i] for i in range(8) if res["output_lens"][i] == 0)
    assert any(t > 0 for t in res["ttfts"])  # at least one stream was cut after its first token


def test_compare_two_tiny_configurations(tmp_path, tiny_engram):
    cfg = CompareConfig(
        variants=[Variant("no-engram", ["--no-engram"]),
                  Variant("ram", ["--engram", str(tiny_engram), "--table-placement", "host"])],
        server_cmd=engram_serve_cmd(), server_args=SERVER_ARGS, out_dir=tmp_path, rounds=2,
        startup_timeout=600,
    )
    reqs = build_requests(WorkloadConfig(dataset="builtin", num_prompts=2, output_len=6))
    cmp = run_compare(cfg, reqs, {"max_concurrency": 2, "progress": False, "warmup_requests": 1})
    s = cmp["summary"]
    assert s["no-engram"]["failed"] == 0 and s["ram"]["failed"] == 0
    ratio = s["ram"]["ratio"]["output_throughput"]
    assert len(ratio["rounds"]) == 2 and 0.1 < ratio["median"] < 10
    assert "cache_hit_rate" not in s["no-engram"]["engram"]
    md = compare_markdown(cmp)
    assert "| `ram` |" in md
    throughput_ratio_plot(cmp, tmp_path / "t.png")
    latency_plot(cmp, tmp_path / "l.png")
    assert (tmp_path / "t.png").stat().st_size > 10_000 and (tmp_path / "l.png").stat().st_size > 10_000
