"""Training metrics: one JSON object per line, and the loss-curve PNG drawn from them.

A record is {"step", "tokens", "kind": "train"|"heldout", "loss", ...}; held-out records name
their held-out set ("split": "in_domain" | "cross_project" | ...). On `--resume` the
log is cut back to the checkpoint's step, so records of steps that were computed after the
last checkpoint (and will be recomputed) appear once, and the curve continues seamlessly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > `step` (and a torn last line from a kill -9)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:   # a line torn by kill -9 mid-write
                continue
        return records


def plot_loss_curve(records: list[dict], png_path: Path, title: str = "Engram training") -> None:
    """Train loss (raw and smoothed) and held-out loss (with the backbone-alone baseline) vs tokens."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    held = [r for r in records if r["kind"] == "heldout"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        xs = [r["tokens"] for r in train]
        ys = [r["loss"] for r in train]
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(xs, _ema(ys, 0.9), color="tab:blue", label="train (EMA)")
    for (name, recs), color in zip(_by_split(held).items(), ("tab:orange", "tab:green", "tab:red", "tab:purple")):
        label = name.replace("_", "-")
        ax.plot([r["tokens"] for r in recs], [r["loss"] for r in recs], "o-", color=color, ms=3,
                label=f"held-out {label}, backbone + Engram")
        ax.axhline(recs[-1]["baseline_loss"], color=color, ls="--", lw=0.9, label=f"held-out {label}, backbone alone")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)


def _by_split(held: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in held:
        out.setdefault(r.get("split", "heldout"), []).append(r)
    return out


def _ema(values: list[float], beta: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out
