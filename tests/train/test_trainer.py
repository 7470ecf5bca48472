"""Training on a tiny real backbone: frozen backbone, sparse rows, atomic resumable checkpoints."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_engram
from engram_runtime.checkpoint import load_checkpoint
from train import ckpt_store
from train.cli import eval_main, train_main
from train.corpus import discover
from train.engram_model import load_engram_lm, open_engram_lm
from train.gates import main as gates_main, token_gates
from train.evaluate import EvalConfig, evaluate
from train.split import split_corpus
from train.trainer import Trainer, TrainConfig, prepare_data

REPO = Path(__file__).resolve().parents[2]


def _cfg(engram: Path, corpus: Path, model: Path, **kw) -> TrainConfig:
    base = dict(engram=str(engram), corpus=[str(corpus)], model=str(model), tokens=2 * 32 * 12, seq_len=32,
                batch_size=2, eval_every=4, ckpt_every=2, eval_tokens=256, heldout_fraction=0.25,
                warmup_steps=2, table_lr=0.1, dense_lr=3e-3, progress=False)
    return TrainConfig(**{**base, **kw})


def _trainer(tmp_path, tiny_model, corpus, dtype="float32") -> Trainer:
    engram = make_engram(tmp_path, tiny_model, dtype)
    cfg = _cfg(engram, corpus, tiny_model)
    loaded = ckpt_store.load_for_training(engram)
    lm = load_engram_lm(cfg.model, loaded)
    data = prepare_data(cfg, split_corpus(discover(cfg.corpus), cfg.split_config), lm.encode, lm.eos_id)
    return Trainer(cfg, lm, data, engram, loaded.ckpt.manifest)


def test_backbone_frozen_and_only_looked_up_rows_change(tmp_path, tiny_model, corpus):
    tr = _trainer(tmp_path, tiny_model, corpus, dtype="bfloat16")
    backbone_before = {k: v.clone() for k, v in tr.lm.backbone.state_dict().items() if "cache" not in k}
    dense_before = {lid: {k: v.clone() for k, v in sd.items()} for lid, sd in tr.lm.dense_state().items()}
    tr.train_step(tr.data.schedule.batch(0))       # value_proj starts at zero: no table gradient yet
    tables_before = {lid: t.clone() for lid, t in tr.lm.tables.items()}
    ids = tr.data.schedule.batch(1)
    looked_up = tr.lm.lookup(ids)
    tr.train_step(ids)
    for name, p in tr.lm.backbone.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for k, v in tr.lm.backbone.state_dict().items():
        if k in backbone_before:
            assert torch.equal(v, backbone_before[k]), k
    assert any(not torch.equal(v, dense_before[1][k]) for k, v in tr.lm.dense_state()[1].items())
    for lid, table in tr.lm.tables.items():
        assert table.dtype == torch.bfloat16
        changed = set((table != tables_before[lid]).any(dim=1).nonzero().flatten().tolist())
        allowed = set(looked_up[lid].unique.tolist())
        assert changed and changed <= allowed
        assert len(changed) >= 0.9 * len(allowed)       # nearly every looked-up row got a gradient
        assert tr.table_opts[lid].sum_sq.count_nonzero() == len(changed)


def _losses(engram: Path) -> list[tuple[int, str, float]]:
    return [(r["step"], r["kind"], r["loss"]) for r in map(json.loads, (engram / "metrics.jsonl").read_text().splitlines())]


def _train_proc(cfg: TrainConfig, *extra: str) -> subprocess.Popen:
    args = ["--engram", cfg.engram, "--corpus", *cfg.corpus, "--model", cfg.model, "--tokens", str(cfg.tokens),
            "--seq-len", str(cfg.seq_len), "--batch-size", str(cfg.batch_size), "--eval-every", str(cfg.eval_every),
            "--ckpt-every", str(cfg.ckpt_every), "--eval-tokens", str(cfg.eval_tokens), "--heldout-fraction",
            str(cfg.heldout_fraction), "--warmup-steps", str(cfg.warmup_steps), "--table-lr", str(cfg.table_lr),
            "--dense-lr", str(cfg.dense_lr), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "from train.cli import train_main; train_main()", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_loss_curve(tmp_path, tiny_model, corpus):
    ref = _cfg(make_engram(tmp_path / "a", tiny_model), corpus, tiny_model)
    cut = _cfg(make_engram(tmp_path / "b", tiny_model), corpus, tiny_model)
    p_ref = _train_proc(ref)
    p_cut = _train_proc(cut)
    metrics = Path(cut.engram) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum(1 for r in _losses(Path(cut.engram)) if r[1] == "train") >= 7:
            break
        time.sleep(0.02)
    assert p_cut.poll() is None, "the run finished before it could be killed"
    p_cut.send_signal(signal.SIGKILL)
    p_cut.wait()
    state = json.loads((Path(cut.engram) / "train_state.json").read_text())
    assert state["step"] in (6, 8)                  # the last atomic checkpoint before the kill
    load_checkpoint(cut.engram, verify_tables=True)   # what is on disk is whole and servable
    out, err = _train_proc(cut, "--resume").communicate(timeout=180)
    assert "error" not in err.lower(), err
    ref_out, ref_err = p_ref.communicate(timeout=180)
    assert p_ref.returncode == 0, ref_err
    a, b = _losses(Path(ref.engram)), _losses(Path(cut.engram))
    assert [x[:2] for x in a] == [x[:2] for x in b]     # same steps, no duplicated records
    # bit-exact up to MKL's alignment-dependent rounding of reloaded tensors (~1 ulp)
    np.testing.assert_allclose([x[2] for x in b], [x[2] for x in a], rtol=2e-6)
    assert a[-1][0] == 12
    for lid in (1, 2):
        ta = ckpt_store.load_for_training(Path(ref.engram)).tables[lid]
        tb = ckpt_store.load_for_training(Path(cut.engram)).tables[lid]
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)
    left = sorted(p.name for p in Path(cut.engram).iterdir())
    assert not [n for n in left if n.endswith((".tmp", ".partial"))]
    assert sum(n.startswith("table_layer1") for n in left) == 1    # superseded tables are deleted


def test_trained_checkpoint_serves_and_eval_reports_gain(trained, tmp_path, capsys):
    cfg, summary = trained
    assert summary["steps"] == 30
    engram = Path(cfg.engram)
    load_checkpoint(engram, verify_tables=True)
    assert (engram / "loss_curve.png").stat().st_size > 10_000
    split = json.loads((engram / "split.json").read_text())
    held_projects = {k.split("/")[1] for k in split["cross_project"]}
    assert split["in_domain"] and split["cross_project"] and split["projects"]["heldout"]
    assert set(split["in_domain"] + split["cross_project"]).isdisjoint(split["train"])
    assert held_projects.isdisjoint(k.split("/")[1] for k in split["train"])      # whole projects held out
    report = evaluate(EvalConfig(engram=str(engram), corpus=cfg.corpus, model=cfg.model, seq_len=32, eval_tokens=256))
    assert sorted(report["sets"]) == ["cross_project", "in_domain"]
    for name, r in report["sets"].items():
        # eval reads the table files memory-mapped; training kept them in memory: same numbers
        assert r["engram_model"]["cross_entropy"] == pytest.approx(summary["heldout"][name]["loss"], abs=1e-5)
        assert r["backbone"]["cross_entropy"] == pytest.approx(summary["heldout"][name]["baseline_loss"], abs=1e-5)
        assert r["tokens_scored"] == 8 * 31 and r["files_scored"] >= 1
        assert sum(p["tokens"] for p in r["per_project"].values()) == r["tokens_scored"]
    assert report["sets"]["in_domain"]["relative_ce_reduction"] > 0.03
    assert set(report["sets"]["cross_project"]["per_project"]) <= {f"corpus/{p}" for p in held_projects}
    eval_main(["--engram", str(engram), "--corpus", *cfg.corpus, "--model", cfg.model, "--seq-len", "32",
               "--eval-tokens", "256"])
    out = capsys.readouterr().out
    assert "| in-domain: 248 tokens" in out and "| cross-project: 248 tokens" in out and "lower CE" in out
    gates_main(["--engram", str(engram), "--model", cfg.model, "--out", str(tmp_path / "g"),
                "def function_1_2(value):\n    return value * 2 + 1\n"])
    assert "layer 1:" in capsys.readouterr().out and (tmp_path / "g.png").stat().st_size > 5_000
    html = (tmp_path / "g.html").read_text()
    assert html.count("<h3>Engram layer") == 2 and "function" in html
    lm = open_engram_lm(cfg.model, engram)
    pieces, gates = token_gates(lm, "def function_1_2(value):")
    assert "".join(pieces) == "def function_1_2(value):" and sorted(gates) == [1, 2]
    assert all(g.shape == (len(pieces),) and ((g > 0) & (g < 1)).all() for g in gates.values())


def test_eval_all_scores_every_file_of_a_new_corpus(trained, tmp_path, capsys):
    cfg, _ = trained
    new = tmp_path / "new"
    for i in range(3):
        (new / f"lib{i}").mkdir(parents=True)
        (new / f"lib{i}" / "a.py").write_text("".join(f"total_{i} = total_{i} + {k}\n" for k in range(30)))
    (new / "lib0" / "copy.py").write_text((new / "lib0" / "a.py").read_text())     # a byte-identical copy
    report = evaluate(EvalConfig(engram=cfg.engram, corpus=[str(new)], model=cfg.model, seq_len=32,
                                 eval_tokens=0, all_files=True))
    (r,) = report["sets"].values()
    assert r["set"] == "all" and r["files_available"] == r["files_scored"] == 3 and r["projects_scored"] == 3
    assert report["provenance"]["duplicates"] == 1 and report["provenance"]["trained_files_included"] == 0
    eval_main(["--engram", cfg.engram, "--corpus", str(new), "--model", cfg.model, "--seq-len", "32",
               "--heldout-fraction", "1"])
    assert "| all: " in capsys.readouterr().out
    # the training corpus itself under --all: the trained files are counted in the report
    report = evaluate(EvalConfig(engram=cfg.engram, corpus=cfg.corpus, model=cfg.model, seq_len=32,
                                 eval_tokens=256, all_files=True))
    assert report["provenance"]["trained_files_included"] > 0


def test_cli_errors_are_one_clear_line(tmp_path, tiny_model, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--engram", str(tmp_path / "e"), "--corpus", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "corpus path does not exist" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "b.txt").write_text("world")
    with pytest.raises(SystemExit):
        train_main(["--engram", str(tmp_path / "nope"), "--corpus", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    assert "nope does not exist" in capsys.readouterr().err
    engram = make_engram(tmp_path, tiny_model)
    with pytest.raises(SystemExit):
        train_main(["--engram", str(engram), "--corpus", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--resume"])
    assert "train_state.json" in capsys.readouterr().err
    table = engram / "table_layer1.safetensors"
    table.write_bytes(table.read_bytes()[:-100])
    with pytest.raises(SystemExit):
        train_main(["--engram", str(engram), "--corpus", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
    err = capsys.readouterr().err
    assert "table_layer1.safetensors" in err and "Traceback" not in err
