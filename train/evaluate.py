"""`engram-eval`: held-out cross-entropy of the backbone alone vs with the Engram memory.

Both numbers are computed on exactly the same tokens in the same process (the held-out
files of the by-file split, fixed windows), so their ratio is the memory's effect and
nothing else. The split is recomputed from the corpus paths with the fraction recorded in
the checkpoint's split.json, i.e. the files `engram-train` never trained on.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from train.batches import eval_windows
from train.corpus import discover, explicit_keys, heldout_stream, split_files
from train.engram_model import EngramLM, open_engram_lm


@dataclass
class EvalConfig:
    engram: str
    corpus: list[str]
    model: str | None = None
    seq_len: int = 256
    eval_tokens: int = 65_536
    batch_size: int = 8
    heldout_fraction: float | None = None     # None: the fraction in DIR/split.json (else 0.05)
    dtype: str = "float32"                    # backbone compute dtype (the server's default)


def heldout_windows(lm: EngramLM, cfg: EvalConfig) -> tuple[list, object]:
    fraction = cfg.heldout_fraction
    split_json = Path(cfg.engram) / "split.json"
    if fraction is None:
        fraction = json.loads(split_json.read_text())["heldout_fraction"] if split_json.exists() else 0.05
    split = split_files(discover(cfg.corpus), fraction)
    stream = heldout_stream(split, lm.encode, lm.eos_id, explicit_keys(cfg.corpus), cfg.eval_tokens, cfg.seq_len)
    return split.heldout, eval_windows(stream, cfg.seq_len, cfg.eval_tokens)


def evaluate(cfg: EvalConfig, lm: EngramLM | None = None) -> dict:
    """Score held-out windows with and without Engram; write eval.json and return the report."""
    lm = lm or open_engram_lm(cfg.model, Path(cfg.engram), cfg.dtype)
    files, windows = heldout_windows(lm, cfg)
    t0 = time.perf_counter()
    base = lm.mean_nll(windows, use_engram=False, batch_size=cfg.batch_size)
    t1 = time.perf_counter()
    with_engram = lm.mean_nll(windows, use_engram=True, batch_size=cfg.batch_size)
    t2 = time.perf_counter()
    scored = windows.shape[0] * (windows.shape[1] - 1)
    report = {
        "engram": str(cfg.engram), "heldout_files": len(files), "tokens_scored": int(scored),
        "seq_len": cfg.seq_len,
        "backbone": {"cross_entropy": base, "perplexity": math.exp(base), "seconds": t1 - t0},
        "engram_model": {"cross_entropy": with_engram, "perplexity": math.exp(with_engram), "seconds": t2 - t1},
        "relative_ce_reduction": 1 - with_engram / base,
    }
    report["markdown"] = markdown_line(report)
    out = Path(cfg.engram) / "eval.json"
    out.write_text(json.dumps(report, indent=1))
    return report


def markdown_line(r: dict) -> str:
    b, e = r["backbone"], r["engram_model"]
    return (f"| {r['tokens_scored']} held-out tokens ({r['heldout_files']} files) "
            f"| backbone CE {b['cross_entropy']:.4f} (ppl {b['perplexity']:.2f}) "
            f"| + Engram CE {e['cross_entropy']:.4f} (ppl {e['perplexity']:.2f}) "
            f"| {100 * r['relative_ce_reduction']:+.2f}% lower CE |")
