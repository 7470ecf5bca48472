"""`engram-eval`: held-out cross-entropy of the backbone alone vs with the Engram memory.

Both numbers are computed on exactly the same tokens in the same process, so their ratio is
the memory's effect and nothing else. What is scored, per held-out set:

* by default the checkpoint's own held-out sets, as `engram-train` recorded them in
  `split.json`: `in_domain` (held-out files of trained projects) and `cross_project` (files
  of projects held out whole); without a split.json the split is computed from the flags;
* with `all_files` (`--all`, or a held-out fraction of 1) every file of the corpus, for a
  corpus the memory never trained on; files that split.json lists as trained are counted.

The report says for each set how many tokens, files and projects were scored, with a
breakdown per project.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.batches import eval_windows
from train.corpus import CorpusFile, discover, explicit_keys
from train.engram_model import EngramLM, open_engram_lm
from train.split import SplitConfig, heldout_stream, split_corpus, unique_texts


@dataclass
class EvalConfig:
    engram: str
    corpus: list[str]
    model: str | None = None
    seq_len: int = 256
    eval_tokens: int = 65_536                 # per held-out set; 0: every token of every file
    batch_size: int = 8
    all_files: bool = False                   # score every file of the corpus
    heldout_fraction: float | None = None     # None: split.json's; 1.0: the same as all_files
    heldout_projects: float | None = None     # None: split.json's
    dtype: str = "float32"                    # backbone compute dtype (the server's default)


def heldout_sets(cfg: EvalConfig) -> tuple[dict[str, list[CorpusFile]], dict]:
    """{set name: files} to score, and what the report should say about where they came from."""
    files = discover(cfg.corpus)
    split_json = Path(cfg.engram) / "split.json"
    recorded = json.loads(split_json.read_text()) if split_json.exists() else None
    if cfg.all_files or cfg.heldout_fraction == 1.0:
        texts, duplicates = unique_texts(files)
        trained = set(recorded["train"]) if recorded else set()
        every = [f for f in files if f.key in texts]
        return {"all": every}, {"source": "every file of the corpus", "duplicates": len(duplicates),
                                "trained_files_included": sum(f.key in trained for f in every)}
    if recorded is not None and cfg.heldout_fraction is None and cfg.heldout_projects is None:
        by_key = {f.key: f for f in files}
        sets = {name: [by_key[k] for k in recorded.get(name, []) if k in by_key]
                for name in ("in_domain", "cross_project")}
        missing = {name: len(recorded.get(name, [])) - len(v) for name, v in sets.items()}
        return {n: v for n, v in sets.items() if v}, {"source": str(split_json), "missing_files": missing}
    split_cfg = SplitConfig(heldout_fraction=cfg.heldout_fraction or 0.05,
                            heldout_projects=cfg.heldout_projects or 0.0)
    return split_corpus(files, split_cfg).heldout(), {"source": f"computed: {split_cfg}"}


def score_set(lm: EngramLM, cfg: EvalConfig, name: str, files: list[CorpusFile]) -> dict:
    """Backbone alone and with Engram on the same windows of `files`, overall and per project."""
    budget = cfg.eval_tokens or None
    stream = heldout_stream(files, lm.encode, lm.eos_id, explicit_keys(cfg.corpus), [], budget, cfg.seq_len)
    windows = eval_windows(stream.tokens, cfg.seq_len, budget)
    n = windows.size
    project_ids = np.asarray([f.project for f in stream.files])[stream.source[:n].reshape(windows.shape)[:, 1:]]
    t0 = time.perf_counter()
    base = lm.token_nll(windows, use_engram=False, batch_size=cfg.batch_size)
    t1 = time.perf_counter()
    mem = lm.token_nll(windows, use_engram=True, batch_size=cfg.batch_size)
    t2 = time.perf_counter()
    per_project = {}
    for project in sorted(set(project_ids.flat)):
        sel = project_ids == project
        b, e = float(base[sel].mean(dtype=np.float64)), float(mem[sel].mean(dtype=np.float64))
        per_project[project] = {"tokens": int(sel.sum()), "backbone_ce": b, "engram_ce": e,
                                "relative_ce_reduction": 1 - e / b}
    b, e = float(base.mean(dtype=np.float64)), float(mem.mean(dtype=np.float64))
    scored_files = {stream.files[i].key for i in np.unique(stream.source[:n])}
    return {"set": name, "files_available": len(files), "files_scored": len(scored_files),
            "projects_scored": len(per_project), "tokens_scored": int(base.size),
            "backbone": {"cross_entropy": b, "perplexity": math.exp(b), "seconds": t1 - t0},
            "engram_model": {"cross_entropy": e, "perplexity": math.exp(e), "seconds": t2 - t1},
            "relative_ce_reduction": 1 - e / b, "per_project": per_project}


def evaluate(cfg: EvalConfig, lm: EngramLM | None = None) -> dict:
    """Score every held-out set with and without Engram; write eval.json and return the report."""
    sets, provenance = heldout_sets(cfg)
    if not sets:
        raise ValueError(f"nothing to score: no held-out file of {', '.join(cfg.corpus)} is on this machine")
    lm = lm or open_engram_lm(cfg.model, Path(cfg.engram), cfg.dtype)
    report = {"engram": str(cfg.engram), "seq_len": cfg.seq_len, "dtype": cfg.dtype, "provenance": provenance,
              "sets": {name: score_set(lm, cfg, name, files) for name, files in sets.items()}}
    report["markdown"] = "\n".join(markdown_line(r) for r in report["sets"].values())
    (Path(cfg.engram) / "eval.json").write_text(json.dumps(report, indent=1))
    return report


def markdown_line(r: dict) -> str:
    b, e = r["backbone"], r["engram_model"]
    return (f"| {r['set'].replace('_', '-')}: {r['tokens_scored']} tokens of {r['files_scored']} files, "
            f"{r['projects_scored']} projects | backbone CE {b['cross_entropy']:.4f} (ppl {b['perplexity']:.2f}) "
            f"| + Engram CE {e['cross_entropy']:.4f} (ppl {e['perplexity']:.2f}) "
            f"| {100 * r['relative_ce_reduction']:+.2f}% lower CE |")
