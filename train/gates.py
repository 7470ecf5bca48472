"""`engram-gates`: where the memory fires. Each token shaded by its gate value, per Engram layer.

This is the picture of the paper's case study: a gate near 1 means the layer took the
N-gram memory's vector for that position (typically inside multi-token names and fixed
phrases), near 0 that it ignored it. Written as a PNG (matplotlib, one panel per layer)
and as HTML (hover a token for its exact value).
"""
from __future__ import annotations

import argparse
import html
import os
from pathlib import Path

import numpy as np

from train.engram_model import EngramLM, open_engram_lm

WRAP = 96            # characters per rendered line
CMAP = "Reds"


def token_gates(lm: EngramLM, text: str) -> tuple[list[str], dict[int, np.ndarray]]:
    """The text's tokens (each decoded alone) and {layer_id: gate per token [T]}."""
    ids = lm.encode([text])[0]
    if not ids:
        raise ValueError("the text has no tokens")
    gates = lm.gates(np.asarray([ids], dtype=np.int64))
    return [lm.decode_token(i) for i in ids], {lid: g[0] for lid, g in gates.items()}


def _layout(pieces: list[str]) -> list[tuple[int, int, str]]:
    """(line, column, shown text) per token: monospace cells, wrapped at WRAP, newlines kept."""
    out, line, col = [], 0, 0
    for piece in pieces:
        shown = piece.replace("\t", "    ").replace("\n", "⏎")
        if col + len(shown) > WRAP and col > 0:
            line, col = line + 1, 0
        out.append((line, col, shown))
        col += len(shown)
        if "\n" in piece:
            line, col = line + 1, 0
    return out


def render_png(pieces: list[str], gates: dict[int, np.ndarray], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    cells = _layout(pieces)
    n_lines = cells[-1][0] + 1
    cmap = plt.get_cmap(CMAP)
    fig, axes = plt.subplots(len(gates), 1, figsize=(12, 0.6 + 0.32 * (n_lines + 1) * len(gates)),
                             squeeze=False)
    for ax, (lid, g) in zip(axes[:, 0], sorted(gates.items())):
        for (line, col, shown), value in zip(cells, g):
            ax.add_patch(Rectangle((col, -line - 1), max(1, len(shown)), 1, color=cmap(float(value)), lw=0))
            ax.text(col, -line - 0.5, shown, family="monospace", fontsize=9, va="center", ha="left")
        ax.set_xlim(0, WRAP + 1)
        ax.set_ylim(-n_lines - 0.2, 0.2)
        ax.axis("off")
        ax.set_title(f"Engram layer {lid}: gate per token (mean {float(np.mean(g)):.3f})", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_html(pieces: list[str], gates: dict[int, np.ndarray], path: Path) -> None:
    blocks = []
    for lid, g in sorted(gates.items()):
        spans = "".join(
            f'<span title="gate {float(v):.3f}" style="background: rgba(220, 40, 30, {float(v):.3f})">'
            f"{html.escape(p)}</span>" for p, v in zip(pieces, g))
        blocks.append(f"<h3>Engram layer {lid} (mean gate {float(np.mean(g)):.3f})</h3><pre>{spans}</pre>")
    path.write_text("<!doctype html><meta charset='utf-8'><title>Engram gates</title>"
                    "<style>pre{white-space:pre-wrap;font-size:14px;line-height:1.5}</style>"
                    + "".join(blocks))


def main(argv: list[str] | None = None) -> None:
    from train.cli import run_cli   # shared error handling of the train console scripts

    p = argparse.ArgumentParser(prog="engram-gates", description=__doc__.splitlines()[0])
    p.add_argument("text", help="the text to analyse (or @FILE to read it from a file)")
    p.add_argument("--engram", required=True, help="Engram checkpoint directory")
    p.add_argument("--model", default=None, help="backbone GGUF file or HF directory (default: SmolLM2-135M)")
    p.add_argument("--out", default="engram_gates", help="output path prefix: writes PREFIX.png and PREFIX.html")
    args = p.parse_args(argv)

    def run() -> None:
        text = Path(args.text[1:]).read_text() if args.text.startswith("@") else args.text
        lm = open_engram_lm(args.model, Path(args.engram))
        pieces, gates = token_gates(lm, text)
        out = Path(args.out)
        if out.parent and not out.parent.exists():
            os.makedirs(out.parent, exist_ok=True)
        render_png(pieces, gates, out.with_suffix(".png"))
        render_html(pieces, gates, out.with_suffix(".html"))
        for lid, g in sorted(gates.items()):
            print(f"layer {lid}: {len(g)} tokens, mean gate {float(np.mean(g)):.3f}, max {float(np.max(g)):.3f}")
        print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.html')}")

    run_cli("engram-gates", run)
