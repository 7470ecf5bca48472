"""Sparse optimizers for the giant Engram tables: only the rows a step looked up change.

A step gathers a few thousand rows of a table that may hold hundreds of millions, so the
update must touch those rows only, and the optimizer state must stay small next to the
table. Two choices, compared side by side by `bench/train.py`:

* `RowWiseAdagrad` (the default): the production recommender recipe (FBGEMM / TorchRec
  "rowwise adagrad"): ONE float of state per row, the running sum of the row's mean squared
  gradient. State = 4 bytes per row, i.e. 1/64 of a float32 64-dim table (1/32 of bf16).
* `SparseAdam`: lazy Adam as in `torch.optim.SparseAdam` (moments of looked-up rows only,
  bias correction from a per-row step count): two full-size moment tensors, 2x the table
  in float32, kept only to measure what the cheaper optimizer gives up.

Both take the table in its storage dtype (float32 or bfloat16), do the arithmetic in
float32 and write the rows back rounded to the storage dtype, so the in-memory table is
exactly what a checkpoint saves and a resumed run continues bit for bit.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class SparseRowOptimizer(ABC):
    """Base: update `table[rows]` from `grad` ([len(rows), dim], rows unique)."""

    name = "base"

    def __init__(self, table: torch.Tensor, lr: float):
        if table.dim() != 2:
            raise ValueError(f"a table must be 2-D [rows, dim], got shape {tuple(table.shape)}")
        self.table = table
        self.lr = lr

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor, lr: float | None = None) -> None:
        if rows.dim() != 1 or grad.shape != (rows.numel(), self.table.shape[1]):
            raise ValueError(f"rows {tuple(rows.shape)} and grad {tuple(grad.shape)} do not match "
                             f"a table of dim {self.table.shape[1]}")
        w = self.table[rows].float()
        w -= self._delta(rows, grad.float(), self.lr if lr is None else lr)
        self.table[rows] = w.to(self.table.dtype)

    @abstractmethod
    def _delta(self, rows: torch.Tensor, g: torch.Tensor, lr: float) -> torch.Tensor:
        """The float32 amount to subtract from the rows; advances the rows' state."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Live state tensors (saved with the checkpoint, restored in place)."""

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for k, v in self.state_dict().items():
            if k not in sd or sd[k].shape != v.shape:
                raise ValueError(f"optimizer state {k!r}: expected shape {tuple(v.shape)}, "
                                 f"got {tuple(sd[k].shape) if k in sd else 'nothing'}")
            v.copy_(sd[k])

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


class RowWiseAdagrad(SparseRowOptimizer):
    """Adagrad with one accumulator per row: G_r += mean(g_r^2); w_r -= lr * g_r / (sqrt(G_r) + eps)."""

    name = "adagrad"

    def __init__(self, table: torch.Tensor, lr: float = 0.05, eps: float = 1e-8,
                 initial_accumulator: float = 0.0):
        super().__init__(table, lr)
        self.eps = eps
        self.sum_sq = torch.full((table.shape[0],), initial_accumulator, dtype=torch.float32)

    def _delta(self, rows, g, lr):
        acc = self.sum_sq[rows] + g.pow(2).mean(dim=1)
        self.sum_sq[rows] = acc
        return lr * g / (acc.sqrt() + self.eps).unsqueeze(1)

    def state_dict(self):
        return {"sum_sq": self.sum_sq}


class SparseAdam(SparseRowOptimizer):
    """Lazy Adam: moments and step count advance only for the rows looked up."""

    name = "adam"

    def __init__(self, table: torch.Tensor, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        super().__init__(table, lr)
        self.betas = betas
        self.eps = eps
        self.exp_avg = torch.zeros(table.shape, dtype=torch.float32)
        self.exp_avg_sq = torch.zeros(table.shape, dtype=torch.float32)
        self.steps = torch.zeros(table.shape[0], dtype=torch.float32)

    def _delta(self, rows, g, lr):
        b1, b2 = self.betas
        m = self.exp_avg[rows].mul_(b1).add_(g, alpha=1 - b1)
        v = self.exp_avg_sq[rows].mul_(b2).addcmul_(g, g, value=1 - b2)
        t = self.steps[rows] + 1
        self.exp_avg[rows], self.exp_avg_sq[rows], self.steps[rows] = m, v, t
        m_hat = m / (1 - b1 ** t).unsqueeze(1)
        v_hat = v / (1 - b2 ** t).unsqueeze(1)
        return lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}


OPTIMIZERS = {cls.name: cls for cls in (RowWiseAdagrad, SparseAdam)}


def make_sparse_optimizer(name: str, table: torch.Tensor, lr: float) -> SparseRowOptimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown table optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](table, lr=lr)
