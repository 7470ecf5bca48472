"""Engram retrofit benchmark: which recipe makes the memory pay beyond its own corpus?

All in one process, on SmolLM2-135M and the default corpus's split (`train.default`: the
stdlib and installed packages, a fifth of the projects held out whole), each run starting from
a fresh `engram-init` checkpoint with the same tokens and data order:

1. variants of the default recipe, one change each (initial rows, row dropout, learning
   rates, whole files, the stdlib alone as training text), each scored on the same
   in-domain and cross-project windows as it trains;
2. throughput: training tokens/s vs the frozen backbone's own forward+backward tokens/s
   (backward to the token embeddings, no weight gradients), timed side by side.

`python -m bench.train` (the variants of VARIANTS, --tokens each; for a quiet machine),
`--variants recipe init-0` for some, `--add` to merge them into the runs already in the results
file (a run's held-out figures depend on its recipe and data order, not on the machine's load,
so runs made apart compare),
`--quick` (tiny: checks the script). Writes bench/results/train.json and train.png. Held-out figures here come from the bf16 backbone
used for training; `make train-default` reports float32 ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench import load_before_run
from engram_runtime.checkpoint import backbone_info, default_config, init_checkpoint
from train import ckpt_store
from train.default import RECIPE, ROWS_PER_HEAD, default_split
from train.engram_model import EngramLM, load_backbone
from train.metrics import MetricsLog
from train.split import CorpusSplit
from train.trainer import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"
# name -> changes to the default recipe (train.default.RECIPE). Two are not TrainConfig fields:
# rows_per_head (the table size) and train_on ("stdlib": only the standard library's projects as
# training text). bench/results/train.json holds the runs that chose the recipe's learning rates.
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "lr-before": {"dense_lr": 2e-3, "table_lr": 0.1},  # the recipe's learning rates until 2026-12-07
    "dense-lr-2e-2": {"dense_lr": 2e-2},
    "table-lr-0.01": {"table_lr": 0.01},
    "table-lr-0.1": {"table_lr": 0.1},
    "init-0": {"table_init_scale": 0.0},
    "init-1": {"table_init_scale": 1.0},
    "row-dropout-0.25": {"row_dropout": 0.25},
    "whole-files": {"file_tokens": 0},
    "stdlib-only": {"train_on": "stdlib"},
}


def fresh_lm(runner, tokenizer, root: Path, name: str, rows_per_head: int) -> tuple[EngramLM, Path]:
    out = root / name
    info = backbone_info(None)
    init_checkpoint(out, default_config(info["vocab_size"], rows_per_head=rows_per_head), info,
                    dtype="float32", progress=False)
    loaded = ckpt_store.load_for_training(out)
    return EngramLM(runner, tokenizer, loaded.ckpt, loaded.tables, trainable=True), out


def timed_fwd_bwd(lm: EngramLM, ids: np.ndarray, engram: bool, repeats: int) -> float:
    """Best seconds of forward+backward: with Engram (grads to rows + dense params) or the
    frozen backbone alone (grads to the token embeddings' output, no weight gradients)."""
    handle = None
    if not engram:
        handle = lm.backbone.tok_embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_())
    best = float("inf")
    try:
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            emb = None
            if engram:
                rows = lm.lookup(ids)
                emb = {lid: lm.gather(lid, r.unique).requires_grad_()[r.inverse] for lid, r in rows.items()}
            lm.loss(torch.from_numpy(ids), emb).backward()
            best = min(best, time.perf_counter() - t0)
    finally:
        if handle is not None:
            handle.remove()
        for layer in lm.engram.values():
            layer.zero_grad(set_to_none=True)
    return best


def variant_split(split: CorpusSplit, train_on: str | None, stdlib_root: str) -> CorpusSplit:
    if train_on is None:
        return split
    if train_on != "stdlib":
        raise ValueError(f"unknown train_on {train_on!r}")
    return dataclasses.replace(split, train=[f for f in split.train if f.key.startswith(stdlib_root + "/")])


def run_one(runner, tokenizer, root: Path, name: str, changes: dict, tokens: int, recipe: dict,
            corpus: list[str], split: CorpusSplit) -> dict:
    changes = dict(changes)
    rows = changes.pop("rows_per_head", ROWS_PER_HEAD)
    run_split = variant_split(split, changes.pop("train_on", None), Path(corpus[0]).name)
    lm, out = fresh_lm(runner, tokenizer, root, name, rows)
    cfg = TrainConfig(engram=str(out), corpus=corpus, tokens=tokens, **{**recipe, **changes})
    t0 = time.perf_counter()
    summary = train(cfg, lm, run_split)
    held = [r for r in MetricsLog(out / "metrics.jsonl").read() if r["kind"] == "heldout"]
    return {"name": name, "date": date.today().isoformat(), "changes": {"rows_per_head": rows, **changes},
            "tokens": summary["tokens"],
            "seconds": time.perf_counter() - t0, "train_tokens_per_s": summary["train_tokens_per_s"],
            "train_projects_read": summary["train_projects_read"], "heldout": summary["heldout"],
            "curve": [{k: r[k] for k in ("tokens", "split", "loss", "rel_gain")} for r in held]}


def kept_runs(path: Path, tokens: int, recipe: dict, replaced: set[str]) -> list[dict]:
    """The runs of an earlier results file that `--add` keeps: those of other names, made with the
    same recipe and training tokens (the comparison is only fair at both equal)."""
    if not path.is_file():
        return []
    earlier = json.loads(path.read_text())
    if earlier["tokens_per_run"] != tokens:
        raise SystemExit(f"--add: {path} has runs of {earlier['tokens_per_run']} tokens, not {tokens}")
    if earlier["recipe"] != recipe:
        raise SystemExit(f"--add: {path} has runs of another recipe ({earlier['recipe']})")
    return [r for r in earlier["runs"] if r["name"] not in replaced]


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in runs:
        cross = [c for c in run["curve"] if c["split"] == "cross_project"]
        a.plot([c["tokens"] for c in cross], [100 * c["rel_gain"] for c in cross], "o-", ms=3, label=run["name"])
    a.set_xlabel("training tokens")
    a.set_ylabel("cross-project held-out CE reduction (%)")
    a.grid(alpha=0.3)
    a.legend(fontsize=7)
    x = np.arange(len(runs))
    for offset, split, color in ((-0.2, "in_domain", "tab:orange"), (0.2, "cross_project", "tab:green")):
        b.bar(x + offset, [100 * r["heldout"].get(split, {}).get("rel_gain", 0) for r in runs], 0.4,
              color=color, label=split.replace("_", "-"))
    b.set_xticks(x, [r["name"] for r in runs], rotation=30, ha="right", fontsize=8)
    b.set_ylabel("held-out CE reduction vs backbone (%)")
    b.set_title(f"{runs[0]['tokens'] if runs else 0} training tokens per run")
    b.grid(alpha=0.3, axis="y")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--tokens", type=int, default=102_400, help="training tokens of each run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--add", action="store_true",
                   help="keep the runs of other names already in the results file (same --tokens)")
    args = p.parse_args(argv)
    recipe = dict(RECIPE, eval_every=25, ckpt_every=10_000)
    if args.quick:
        args.tokens, args.variants = 2 * 64 * 6, args.variants[:2]
        recipe.update(seq_len=64, batch_size=2, eval_every=3, eval_tokens=256, warmup_steps=2)
    load_start = [load_before_run(), *os.getloadavg()[1:]]
    t0 = time.perf_counter()
    corpus, split = default_split()
    split_s = time.perf_counter() - t0
    runner, tokenizer = load_backbone(None, recipe["dtype"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        for name in args.variants:
            changes = dict(VARIANTS[name], **({"rows_per_head": 4096} if args.quick else {}))
            runs.append(run_one(runner, tokenizer, root, name, changes, args.tokens, recipe, corpus, split))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
            for f in (root / name).iterdir():      # a run's 1 GB of tables is not needed any more
                f.unlink()
        lm, _ = fresh_lm(runner, tokenizer, root, "throughput", 4096 if args.quick else ROWS_PER_HEAD)
        ids = np.random.default_rng(0).integers(0, runner.config.vocab_size,
                                                (recipe["batch_size"], recipe["seq_len"]))
        t_engram = timed_fwd_bwd(lm, ids, engram=True, repeats=3)
        t_backbone = timed_fwd_bwd(lm, ids, engram=False, repeats=3)
    n = ids.size
    result = {
        "quick": args.quick, "tokens_per_run": args.tokens, "recipe": recipe, "corpus": corpus,
        "split": {"seconds": split_s, "train_files": len(split.train), "in_domain_files": len(split.in_domain),
                  "cross_project_files": len(split.cross_project), "duplicates": len(split.duplicates),
                  "near_duplicates": len(split.near_duplicates),
                  "heldout_projects": sorted({f.project for f in split.cross_project}),
                  "train_projects": len({f.project for f in split.train})},
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "throughput": {"tokens_per_step": n, "engram_fwd_bwd_tokens_per_s": n / t_engram,
                       "backbone_fwd_bwd_tokens_per_s": n / t_backbone,
                       "engram_over_backbone_time": t_engram / t_backbone},
    }
    name = "train_quick" if args.quick else "train"
    if args.add:
        result["runs"] = kept_runs(RESULTS / f"{name}.json", args.tokens, recipe, {r["name"] for r in runs}) + runs
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{name}.png")
    print(json.dumps({"throughput": result["throughput"],
                      "gains": {r["name"]: {k: v["rel_gain"] for k, v in r["heldout"].items()} for r in runs}},
                     indent=1))


if __name__ == "__main__":
    main()
