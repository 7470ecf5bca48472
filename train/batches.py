"""Deterministic data order: the batch of step s is a pure function of (stream, seed, s).

That is what makes `--resume` continue the same loss curve: a resumed run needs only the
step number to see exactly the windows the interrupted run would have seen next, with no
iterator state to save. Windows are non-overlapping `seq_len` slices of the training token
stream; each epoch visits them in a fresh seeded permutation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class WindowSchedule:
    stream: np.ndarray      # int32 token stream (documents joined by EOS)
    seq_len: int
    batch_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        self.num_windows = len(self.stream) // self.seq_len
        if self.num_windows < 1:
            raise ValueError(f"the training stream has {len(self.stream)} tokens, fewer than one "
                             f"window of seq_len={self.seq_len}; add text or lower --seq-len")
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> np.ndarray:
        """Token ids [batch_size, seq_len] (int64) for training step `step` (0-based)."""
        out = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        for i in range(self.batch_size):
            sample = step * self.batch_size + i
            epoch, pos = divmod(sample, self.num_windows)
            w = int(self._permutation(epoch)[pos])
            out[i] = self.stream[w * self.seq_len:(w + 1) * self.seq_len]
        return out


def eval_windows(stream: np.ndarray, seq_len: int, max_tokens: int | None) -> np.ndarray:
    """The held-out windows [n, seq_len], in stream order, at most `max_tokens` tokens.

    Fixed (no shuffling) so every evaluation of every run scores exactly the same tokens.
    """
    n = len(stream) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise ValueError(f"the held-out stream has {len(stream)} tokens, fewer than one window "
                         f"of seq_len={seq_len}")
    return stream[:n * seq_len].reshape(n, seq_len).astype(np.int64)
