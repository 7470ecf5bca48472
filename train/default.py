"""`make train-default`: the default trained memory for SmolLM2-135M, from an offline corpus.

Corpus: this interpreter's standard library and the packages installed in its environment
(Python sources and docs, deduplicated; every package, and every stdlib package, a project).
A fifth of the projects is held out whole, so the figure the run reports measures transfer to
code it never saw (cross-project), beside held-out files of the trained projects (in-domain).
Training reads projects in rounds and at most `file_tokens` from each file, so the ~1M tokens
the budget allows span every trained project instead of the biggest few.

Memory: Engram layers 1 and 15, orders 2-3, 8 heads x 64 dims per order, ~2.1M rows per layer
table (float32, so small Adagrad updates are not rounded away), rows started at
N(0, TABLE_INIT_SCALE^2); sequence 256, batch 4, row-wise Adagrad on rows, AdamW on the dense
part, backbone in bf16 while training where the CPU has bf16 dot products (AVX-512 BF16 or AMX;
elsewhere torch's bf16 matmul is a plain loop, several times slower than float32, so float32
there); the final evaluation runs in float32 like the server. docs/training.md has the
measurements behind these choices.

Time budget: the whole target must finish within `--budget-min` (45) minutes on the machine
it runs on, so the token count is not fixed: a training step is timed first, and the run gets
the tokens that fit in what is left after loading, periodic evaluations, checkpoints and the
final evaluation. The chosen count is saved with the run, so re-running the target after an
interruption resumes the same run, and re-running it after completion only re-evaluates.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from engram_runtime.checkpoint import backbone_info, default_config, init_checkpoint
from engram_runtime.model_runner import cpu_has_bf16_dot
from train import ckpt_store
from train.cli import run_cli
from train.corpus import PYTHON_SUFFIXES, default_corpus, discover
from train.engram_model import EngramLM, load_engram_lm
from train.evaluate import EvalConfig, evaluate
from train.split import CorpusSplit, split_corpus
from train.trainer import TrainConfig, train

DEFAULT_DIR = Path("checkpoints/engram-smollm2-stdlib")
ROWS_PER_HEAD = 131_072
# The learning rates were chosen by `python -m bench.train` (docs/performance.md, "Training"):
# against 2e-3 / 0.1, a faster dense part and slower rows raised the cross-project gain by half.
RECIPE = dict(dtype="bfloat16" if cpu_has_bf16_dot() else "float32", seq_len=256, batch_size=4, table_lr=0.03,
              dense_lr=1e-2, warmup_steps=10, eval_every=100, eval_tokens=4096, ckpt_every=200,
              heldout_fraction=0.05, heldout_projects=0.2, file_tokens=2048, table_init_scale=0.01)
FINAL_EVAL_TOKENS = 16_384      # per held-out set
MAX_TOKENS = 4_000_000


def default_split() -> tuple[list[str], CorpusSplit]:
    """The default corpus's paths and its split (reads every file once: a few seconds)."""
    corpus = default_corpus()
    cfg = TrainConfig(engram="", corpus=corpus, **RECIPE)
    return corpus, split_corpus(discover(corpus, PYTHON_SUFFIXES), cfg.split_config)


def time_train_step(lm: EngramLM, batch_size: int, seq_len: int, repeats: int = 2) -> float:
    """Seconds of one forward+backward at the recipe's shape (random tokens, no update)."""
    rng = np.random.default_rng(0)
    best = float("inf")
    for _ in range(repeats + 1):              # the first call warms up allocators and kernels
        ids = rng.integers(0, lm.backbone.config.vocab_size, (batch_size, seq_len))
        t0 = time.perf_counter()
        rows = lm.lookup(ids)
        emb = {lid: lm.gather(lid, r.unique).requires_grad_()[r.inverse] for lid, r in rows.items()}
        lm.loss(torch.from_numpy(ids), emb).backward()
        best = min(best, time.perf_counter() - t0)
    for layer in lm.engram.values():
        layer.zero_grad(set_to_none=True)
    return best


def plan_tokens(step_s: float, elapsed_s: float, budget_s: float, heldout_sets: int) -> int:
    """Training tokens that fit the budget. A forward-only evaluation token costs about a third
    of a training token in bfloat16 and twice that in the final evaluation's float32; the
    evaluations (about a dozen) and checkpoints get their share before training does."""
    tok_s = RECIPE["seq_len"] * RECIPE["batch_size"] / step_s
    forward_tokens = heldout_sets * (FINAL_EVAL_TOKENS * 2 * 2 + RECIPE["eval_tokens"] * 12)
    train_s = 0.9 * (budget_s - elapsed_s - forward_tokens / (3 * tok_s)) - 60     # 60 s: checkpoints, plot
    per_step = RECIPE["seq_len"] * RECIPE["batch_size"]
    return int(min(MAX_TOKENS, max(per_step, train_s * tok_s)) // per_step * per_step)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="train.default", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="checkpoint directory (default %(default)s)")
    p.add_argument("--budget-min", type=float, default=45.0, help="wall-clock budget of the whole target")
    p.add_argument("--tokens", type=int, default=None, help="fix the training tokens instead of timing a step")
    args = p.parse_args(argv)

    def run() -> None:
        t0 = time.perf_counter()
        corpus, split = default_split()
        out: Path = args.out
        resume = (out / ckpt_store.TRAIN_STATE).exists()
        if not out.exists():
            backbone = backbone_info(None)
            init_checkpoint(out, default_config(backbone["vocab_size"], rows_per_head=ROWS_PER_HEAD),
                            backbone, dtype="float32")
        lm = None if resume else load_engram_lm(None, ckpt_store.load_for_training(out), RECIPE["dtype"])
        tokens = args.tokens
        if resume:
            tokens = json.loads((out / ckpt_store.TRAIN_STATE).read_text())["config"]["tokens"]
        elif tokens is None:
            step_s = time_train_step(lm, RECIPE["batch_size"], RECIPE["seq_len"])
            tokens = plan_tokens(step_s, time.perf_counter() - t0, args.budget_min * 60, len(split.heldout()))
            print(f"one training step takes {step_s:.2f} s: training on {tokens} tokens to fit "
                  f"{args.budget_min:.0f} minutes")
        cfg = TrainConfig(engram=str(out), corpus=corpus, tokens=tokens, resume=resume, **RECIPE)
        summary = train(cfg, lm, split)
        report = evaluate(EvalConfig(engram=str(out), corpus=corpus, seq_len=RECIPE["seq_len"],
                                     eval_tokens=FINAL_EVAL_TOKENS))
        summary = {**summary, "final_eval": report, "wall_seconds": time.perf_counter() - t0}
        (out / "train_default.json").write_text(json.dumps(summary, indent=1))
        print(report["markdown"])
        print(f"done in {summary['wall_seconds'] / 60:.1f} min; serve it with: engram-serve --engram {out}")

    run_cli("train-default", run)


if __name__ == "__main__":
    main()
