"""The paper's probes of what a memory changes inside the model, on held-out windows.

* Logit lens: the residual stream after each layer read out through the final norm and the
  LM head, and its KL divergence to the model's final prediction. A model whose early layers
  already predict like its last one has more effective depth left for other work (the
  paper: Engram models reach final-like predictions in earlier layers).
* CKA: linear centered kernel alignment between every layer of the backbone alone and every
  layer of the model with the memory. Above the diagonal = a layer with the memory resembles
  a deeper layer of the backbone (the paper: shallow Engram layers match deeper baseline ones).
* Coverage: for each position, the share of its table rows that training ever updated, and
  the memory's gate and cross-entropy change at positions of each coverage level: how the
  memory behaves where it has nothing to say.

The first position of every window is left out of the lens and CKA: it is the attention sink,
whose outsized activations would dominate a linear CKA.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from train.engram_model import EngramLM

COVERAGE_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


@contextmanager
def _captured_layers(lm: EngramLM):
    """Collects each block's output (the residual stream after that layer) during forwards, copied:
    the next block's fused residual add writes into it."""
    out: list[list[torch.Tensor]] = [[] for _ in lm.backbone.layers]
    hooks = [block.register_forward_hook(lambda m, i, o, k=k: out[k].append(o.detach().to(torch.float32, copy=True)))
             for k, block in enumerate(lm.backbone.layers)]
    try:
        yield out
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def layer_states(lm: EngramLM, windows: np.ndarray, use_engram: bool, batch_size: int) -> torch.Tensor:
    """[layers, N, hidden] float32: every layer's residual stream at every position but the first
    of each window (N = n * (T - 1))."""
    with _captured_layers(lm) as captured:
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            lm.logits(torch.from_numpy(ids), lm.embeddings(ids) if use_engram else None)
    b, t = windows.shape
    return torch.stack([torch.cat(c).view(b, t, -1)[:, 1:].reshape(b * (t - 1), -1) for c in captured])


def _early_exit(lm: EngramLM, x: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token read from a residual stream [N, D] through the
    model's own final norm and LM head."""
    head = lm.backbone.output
    return torch.log_softmax(head(lm.backbone.norm(x, head.dtype)).float(), dim=-1)


@torch.no_grad()
def logit_lens_kl(lm: EngramLM, states: torch.Tensor, chunk: int = 256) -> np.ndarray:
    """[layers] mean KL(final prediction || layer l's early exit), nats; the last layer's is 0."""
    kl = torch.zeros(states.shape[0], dtype=torch.float64)
    for s in range(0, states.shape[1], chunk):
        final = _early_exit(lm, states[-1, s:s + chunk])
        for k in range(states.shape[0] - 1):
            kl[k] += float((final.exp() * (final - _early_exit(lm, states[k, s:s + chunk]))).sum())
    return (kl / states.shape[1]).numpy()


def linear_cka(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """[La, Lb] linear CKA between the layers of `a` [La, N, D] and `b` [Lb, N, D] (same N rows):
    ||A'B||_F^2 / (||A'A||_F ||B'B||_F) with centered A, B; 1 means the same up to rotation and scale."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    self_a = torch.stack([torch.linalg.matrix_norm(x.T @ x) for x in a])
    self_b = torch.stack([torch.linalg.matrix_norm(y.T @ y) for y in b])
    cross = torch.stack([torch.stack([torch.linalg.matrix_norm(x.T @ y) ** 2 for y in b]) for x in a])
    return (cross / (self_a[:, None] * self_b[None, :])).numpy()


@dataclass
class CoverageLevel:
    low: float
    high: float
    positions: int
    gate: dict[int, float]          # mean gate per Engram layer
    backbone_ce: float
    engram_ce: float


@torch.no_grad()
def coverage(lm: EngramLM, windows: np.ndarray, updated: dict[int, torch.Tensor], batch_size: int) -> list[CoverageLevel]:
    """Positions grouped by the share of their rows (all heads, all Engram layers) that training
    updated (`updated`: a bool per table row), with the memory's gate and the CE of the next token
    with and without it."""
    share, gates, base, mem = [], {lid: [] for lid in lm.engram}, [], []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        rows = lm.lookup(ids)
        share.append(torch.cat([updated[lid][r.unique][r.inverse] for lid, r in rows.items()], -1).float().mean(-1))
        emb = lm.embeddings(ids, rows)
        base.append(lm.loss(torch.from_numpy(ids), None, reduction="none").view(len(ids), -1))
        mem.append(lm.loss(torch.from_numpy(ids), emb, reduction="none").view(len(ids), -1))
        for lid, layer in lm.engram.items():
            gates[lid].append(layer.last_gate.mean(-1))
    share_t = torch.cat(share)[:, :-1]          # the memory at position t shapes the prediction of t + 1
    gate_t = {lid: torch.cat(g)[:, :-1] for lid, g in gates.items()}
    base_t, mem_t = torch.cat(base), torch.cat(mem)
    levels = []
    edges = list(zip(COVERAGE_BINS[:-1], COVERAGE_BINS[1:]))
    for k, (low, high) in enumerate(edges):
        sel = (share_t >= low) & ((share_t < high) if k < len(edges) - 1 else (share_t <= high))
        if sel.any():
            levels.append(CoverageLevel(low, high, int(sel.sum()), {lid: float(g[sel].mean()) for lid, g in gate_t.items()},
                                        float(base_t[sel].double().mean()), float(mem_t[sel].double().mean())))
    return levels
