"""Engram retrofit benchmark: does the trained memory pay, and what does training cost?

All in one process, on SmolLM2-135M and the standard-library corpus (held-out = files the
training never saw), each run starting from a fresh `engram-init` checkpoint:

1. gain vs table size: runs with the same tokens and recipe, tables of increasing rows;
   held-out CE of backbone + Engram vs backbone alone on the same tokens;
2. gain vs training tokens: the held-out evaluations along the largest run (and, if
   present, along `make train-default`'s run, read from its metrics.jsonl);
3. sparse optimizer choice: row-wise Adagrad vs lazy sparse Adam on the middle table size:
   held-out gain, optimizer-state bytes, table-update time per step;
4. throughput: training tokens/s vs the frozen backbone's own forward+backward tokens/s
   (backward to the token embeddings, no weight gradients), timed side by side.

`python -m bench.train` (full: a few runs of --tokens each; for a quiet machine) or
`--quick` (tiny, checks the script). Writes bench/results/train.json and train.png.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engram_runtime.checkpoint import backbone_info, default_config, init_checkpoint
from train import ckpt_store
from train.corpus import default_corpus
from train.default import DEFAULT_DIR, RECIPE, TABLE_INIT_STD
from train.engram_model import EngramLM, load_backbone
from train.metrics import MetricsLog
from train.trainer import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_lm(runner, tokenizer, root: Path, name: str, rows_per_head: int) -> tuple[EngramLM, Path]:
    out = root / name
    info = backbone_info(None)
    init_checkpoint(out, default_config(info["vocab_size"], rows_per_head=rows_per_head), info,
                    dtype="float32", progress=False)
    loaded = ckpt_store.load_for_training(out)
    for table in loaded.tables.values():      # the default recipe's start (train.default)
        table.mul_(TABLE_INIT_STD)
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


def run_one(runner, tokenizer, root: Path, name: str, rows: int, tokens: int, optimizer: str,
            recipe: dict, corpus: list[str]) -> dict:
    lm, out = fresh_lm(runner, tokenizer, root, name, rows)
    lr = recipe["table_lr"] if optimizer == "adagrad" else 1e-2
    cfg = TrainConfig(engram=str(out), corpus=corpus, tokens=tokens, table_optimizer=optimizer,
                      **{**recipe, "table_lr": lr})
    t0 = time.perf_counter()
    summary = train(cfg, lm)
    held = [r for r in MetricsLog(out / "metrics.jsonl").read() if r["kind"] == "heldout"]
    state = sum(o.numel() * o.element_size() for o in
                torch.load(out / json.loads((out / ckpt_store.TRAIN_STATE).read_text())["optim_file"],
                           weights_only=True)["tables"][1].values())
    table_bytes = lm.tables[1].numel() * lm.tables[1].element_size()
    return {"name": name, "rows_per_head": rows, "table_rows": int(lm.tables[1].shape[0]),
            "table_bytes_per_layer": table_bytes, "optimizer": optimizer, "table_lr": lr,
            "optimizer_state_bytes_per_layer": state, "state_over_table": state / table_bytes,
            "tokens": summary["tokens"], "seconds": time.perf_counter() - t0,
            "train_tokens_per_s": summary["train_tokens_per_s"], "baseline_ce": summary["baseline_loss"],
            "heldout_ce": summary["heldout_loss"], "rel_gain": summary["rel_gain"],
            "curve": [{"tokens": r["tokens"], "rel_gain": r["rel_gain"], "ce": r["loss"]} for r in held]}


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        xs = [c["tokens"] for c in run["curve"]]
        a.plot(xs, [100 * c["rel_gain"] for c in run["curve"]], "o-", ms=3,
               label=f"{run['optimizer']}, {run['table_rows'] / 1e6:.2f}M rows/layer")
    if result.get("default_run_curve"):
        c = result["default_run_curve"]
        a.plot([x["tokens"] for x in c], [100 * x["rel_gain"] for x in c], "s-", ms=3, color="k",
               label="make train-default")
    a.axhline(3, color="gray", ls="--", lw=0.8)
    a.set_xlabel("training tokens")
    a.set_ylabel("held-out CE reduction vs backbone (%)")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    sized = sorted((r for r in result["runs"] if r["optimizer"] == "adagrad"), key=lambda r: r["table_bytes_per_layer"])
    b.semilogx([r["table_bytes_per_layer"] * 2 / 1e6 for r in sized], [100 * r["rel_gain"] for r in sized], "o-")
    b.set_xlabel("total table size (MB, 2 layers, float32)")
    b.set_ylabel("held-out CE reduction (%)")
    b.set_title(f"same {sized[0]['tokens'] if sized else 0} training tokens")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.train", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--tokens", type=int, default=100_000, help="training tokens of each sweep run")
    p.add_argument("--rows", type=int, nargs="+", default=[8192, 32768, 131072], help="rows per head")
    p.add_argument("--default-dir", type=Path, default=DEFAULT_DIR, help="make train-default's checkpoint")
    args = p.parse_args(argv)
    recipe = dict(RECIPE)
    if args.quick:
        args.tokens, args.rows = 2 * 64 * 6, [1024, 4096]
        recipe.update(seq_len=64, batch_size=2, eval_every=3, eval_tokens=256, ckpt_every=100, warmup_steps=2)
    load_start = list(os.getloadavg())
    corpus = default_corpus()
    runner, tokenizer = load_backbone(None, recipe["dtype"])
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        for rows in args.rows:
            runs.append(run_one(runner, tokenizer, root, f"adagrad-{rows}", rows, args.tokens, "adagrad",
                                recipe, corpus))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}))
        mid = args.rows[len(args.rows) // 2]
        runs.append(run_one(runner, tokenizer, root, f"adam-{mid}", mid, args.tokens, "adam", recipe, corpus))
        print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}))
        lm, _ = fresh_lm(runner, tokenizer, root, "throughput", mid)
        ids = np.random.default_rng(0).integers(0, runner.config.vocab_size,
                                                (recipe["batch_size"], recipe["seq_len"]))
        t_engram = timed_fwd_bwd(lm, ids, engram=True, repeats=3)
        t_backbone = timed_fwd_bwd(lm, ids, engram=False, repeats=3)
    n = ids.size
    result = {
        "quick": args.quick, "recipe": recipe, "corpus": corpus, "runs": runs,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load_start, "loadavg_end": list(os.getloadavg())},
        "throughput": {"tokens_per_step": n, "engram_fwd_bwd_tokens_per_s": n / t_engram,
                       "backbone_fwd_bwd_tokens_per_s": n / t_backbone,
                       "engram_over_backbone_time": t_engram / t_backbone,
                       "train_loop_tokens_per_s": runs[0]["train_tokens_per_s"]},
        "optimizer_choice": {r["optimizer"]: {"rel_gain": r["rel_gain"], "state_over_table": r["state_over_table"]}
                             for r in runs if r["rows_per_head"] == mid},
    }
    default_metrics = args.default_dir / "metrics.jsonl"
    if default_metrics.exists():
        result["default_run_curve"] = [{"tokens": r["tokens"], "rel_gain": r["rel_gain"]}
                                       for r in MetricsLog(default_metrics).read() if r["kind"] == "heldout"]
        final = args.default_dir / "eval.json"
        if final.exists():
            result["default_run_final_eval"] = json.loads(final.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "train_quick" if args.quick else "train"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / f"{name}.png")
    print(json.dumps({"throughput": result["throughput"], "optimizer_choice": result["optimizer_choice"]}, indent=1))


if __name__ == "__main__":
    main()
