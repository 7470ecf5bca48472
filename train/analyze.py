"""`engram-analyze`: the paper's probes on held-out text, as PNGs a person reads and one JSON.

    engram-analyze --engram CKPT [--corpus PATHS] [--set cross_project] [--tokens 2048] [--out DIR]

Writes DIR/logit_lens.png (KL of each layer's early exit to the final prediction, backbone
alone vs with the memory), DIR/cka.png (linear CKA between the two models' layers, with the
backbone layer each memory layer resembles most), DIR/coverage.png (gate and CE change by the
share of a position's rows that training updated) and DIR/analysis.json with all the numbers.
The text is the checkpoint's held-out set (`split.json`) of the corpus it was trained on, or
every file of `--corpus` with `--all`. What each probe means: train/probes.py.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from train import ckpt_store
from train.batches import eval_windows
from train.corpus import explicit_keys
from train.engram_model import EngramLM, open_engram_lm
from train.evaluate import EvalConfig, heldout_sets
from train.probes import coverage, layer_states, linear_cka, logit_lens_kl
from train.split import heldout_stream


def updated_rows(ckpt_dir: Path) -> dict[int, torch.Tensor] | None:
    """{layer_id: bool per table row}: the rows the sparse optimizer ever moved (its state says),
    or None for a checkpoint without training state (e.g. converted to fp8)."""
    if not (ckpt_dir / ckpt_store.TRAIN_STATE).is_file():
        return None
    _, tensors = ckpt_store.load_train_state(ckpt_dir)
    out = {}
    for lid, state in tensors["tables"].items():
        counter = state["sum_sq"] if "sum_sq" in state else state["steps"]
        out[int(lid)] = counter > 0
    return out


def analyze(lm: EngramLM, windows: np.ndarray, updated: dict[int, torch.Tensor] | None, batch_size: int) -> dict:
    base = layer_states(lm, windows, use_engram=False, batch_size=batch_size)
    mem = layer_states(lm, windows, use_engram=True, batch_size=batch_size)
    kl_base, kl_mem = logit_lens_kl(lm, base), logit_lens_kl(lm, mem)
    cka = linear_cka(mem, base)                  # rows: layers with the memory; columns: backbone layers
    del base, mem
    best = cka.argmax(axis=1)
    inner = slice(0, len(kl_base) - 1)           # the last layer's KL is 0 by definition
    return {"layers": len(kl_base), "engram_layers": sorted(lm.engram), "positions": int(windows.shape[0] * (windows.shape[1] - 1)),
            "logit_lens_kl": {"backbone": kl_base.tolist(), "engram": kl_mem.tolist()},
            "logit_lens_summary": {"layers_closer_to_final": int((kl_mem[inner] < kl_base[inner]).sum()),
                                   "mean_kl_ratio": float(np.mean(kl_mem[inner] / kl_base[inner]))},
            "cka": cka.tolist(), "cka_best_backbone_layer": best.tolist(),
            "cka_summary": {"mean_shift_layers": float(np.mean(best - np.arange(len(best)))),
                            "diagonal_mean": float(np.mean(np.diag(cka)))},
            "coverage": [asdict(c) for c in coverage(lm, windows, updated, batch_size)] if updated else None}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_lens(r: dict, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    n = r["layers"] - 1
    for name, color in (("backbone", "tab:gray"), ("engram", "tab:red")):
        ax.semilogy(range(n), r["logit_lens_kl"][name][:n], "o-", ms=3, color=color,
                    label="backbone alone" if name == "backbone" else "backbone + Engram")
    for lid in r["engram_layers"]:
        ax.axvline(lid, color="tab:red", ls=":", lw=0.8)
    ax.set_xlabel("layer (early exit after it; dotted: Engram layers)")
    ax.set_ylabel("KL(final || early exit), nats")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cka(r: dict, path: Path, title: str) -> None:
    plt = _plt()
    cka = np.asarray(r["cka"])
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    im = ax.imshow(cka, origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax.plot(r["cka_best_backbone_layer"], range(len(cka)), "w.", ms=6, label="most similar backbone layer")
    ax.plot([0, len(cka) - 1], [0, len(cka) - 1], "w--", lw=0.7)
    ax.set_xlabel("backbone alone: layer")
    ax.set_ylabel("backbone + Engram: layer")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_coverage(levels: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    names = [f"{100 * c['low']:.0f}-{100 * c['high']:.0f}%" for c in levels]
    x = np.arange(len(levels))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(x, [100 * (1 - c["engram_ce"] / c["backbone_ce"]) for c in levels], color="tab:green")
    for i, c in enumerate(levels):
        a.annotate(f"{c['positions']} pos.", (i, 0), ha="center", va="bottom", fontsize=7)
    a.set_xticks(x, names)
    a.set_xlabel("share of the position's rows updated in training")
    a.set_ylabel("CE reduction vs backbone (%)")
    a.grid(alpha=0.3, axis="y")
    for k, lid in enumerate(sorted(levels[0]["gate"], key=int)):
        b.bar(x + (k - 0.5) * 0.4, [c["gate"][lid] for c in levels], 0.4, label=f"layer {lid}")
    b.set_xticks(x, names)
    b.set_xlabel("share of the position's rows updated in training")
    b.set_ylabel("mean gate")
    b.legend(fontsize=8)
    b.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from train.cli import run_cli   # shared error handling of the train console scripts

    p = argparse.ArgumentParser(prog="engram-analyze", description=__doc__.splitlines()[0])
    p.add_argument("--engram", required=True, help="Engram checkpoint directory")
    p.add_argument("--model", default=None, help="backbone GGUF file or HF directory (default: SmolLM2-135M)")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="corpus paths (default: the ones the checkpoint was trained on)")
    p.add_argument("--set", default="cross_project", choices=["cross_project", "in_domain"],
                   help="which of the checkpoint's held-out sets to read")
    p.add_argument("--all", dest="all_files", action="store_true", help="every file of --corpus instead")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens to analyse")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone compute dtype")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: CKPT/analysis)")
    args = p.parse_args(argv)

    def run() -> None:
        ckpt = Path(args.engram)
        corpus = args.corpus or trained_corpus(ckpt)
        cfg = EvalConfig(engram=str(ckpt), corpus=corpus, model=args.model, seq_len=args.seq_len,
                         eval_tokens=args.tokens, all_files=args.all_files)
        sets, _ = heldout_sets(cfg)
        name = "all" if args.all_files else args.set
        if name not in sets:
            raise ValueError(f"the checkpoint has no {name} held-out set on this machine (sets: {sorted(sets)})")
        lm = open_engram_lm(args.model, ckpt, args.dtype)
        stream = heldout_stream(sets[name], lm.encode, lm.eos_id, explicit_keys(corpus), [], args.tokens, args.seq_len)
        windows = eval_windows(stream.tokens, args.seq_len, args.tokens)
        result = {"engram": str(ckpt), "set": name, "files": len(stream.files), "projects": stream.projects(),
                  "dtype": args.dtype, **analyze(lm, windows, updated_rows(ckpt), args.batch_size)}
        out = args.out or ckpt / "analysis"
        out.mkdir(parents=True, exist_ok=True)
        (out / "analysis.json").write_text(json.dumps(result, indent=1))
        about = f"{result['positions']} {name.replace('_', '-')} positions, {result['files']} files"
        plot_lens(result, out / "logit_lens.png", f"Logit lens: {about}")
        plot_cka(result, out / "cka.png", f"Layer similarity (linear CKA): {about}")
        if result["coverage"]:
            plot_coverage(result["coverage"], out / "coverage.png", f"The memory by row coverage: {about}")
        lens, cka = result["logit_lens_summary"], result["cka_summary"]
        print(f"logit lens: {lens['layers_closer_to_final']} of {result['layers'] - 1} layers closer to the final "
              f"prediction with the memory (mean KL ratio {lens['mean_kl_ratio']:.3f}); CKA: each layer with the "
              f"memory resembles the backbone {cka['mean_shift_layers']:+.2f} layers away on average")
        print(f"wrote {out}/analysis.json and its plots")

    run_cli("engram-analyze", run)


def trained_corpus(ckpt: Path) -> list[str]:
    """The corpus paths the checkpoint was trained on, as its training state recorded them."""
    return ckpt_store.read_json(ckpt / ckpt_store.TRAIN_STATE)["config"]["corpus"]


if __name__ == "__main__":
    main()
