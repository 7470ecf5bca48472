"""DeviceHasher: NgramHasher's row ids computed with tensors on the compute device.

On CUDA the sampled token ids stay on the GPU: hashing them there, instead of copying them
to the host, hashing in numpy and uploading the row ids, takes a round trip out of every
decode step and lets the hashing join the step's CUDA graph. So everything here is torch
ops on tensors of one device, shaped by the inputs' shapes alone, without host syncs: no
`.item()`, no boolean-mask indexing, in-place updates by index_copy_ / index_fill_. Python
indexing (`t[i]`, `t[:, :k]`) and `copy_` are avoided too: under FakeTensorMode on a CPU-only
torch they cannot trace on "cuda", and those traces are how the CUDA path is checked
without a GPU.

The arithmetic is the reference's (NgramHasher._rows): int64 products wrap like numpy's, XOR
accumulates over the orders and torch.remainder, like numpy's %, takes the divisor's sign,
so the ids are bit-identical to NgramHasher.hash / step_rows.
"""
from __future__ import annotations

import numpy as np
import torch

from .hashing import NgramHasher


class DeviceHasher:
    """Global row ids of a step's new tokens, with each KV slot's N-gram history on the device.

    A slot's history is its sequence's last N - 1 *compressed* ids; a fresh (or reset) slot
    holds the compressed pad id, as the reference left-pads a sequence's start. Slots given in
    one call must be distinct (index_copy_ with repeated indices keeps an arbitrary one).
    Token ids must lie inside the tokenizer's vocabulary: checking it would sync the host.
    """

    def __init__(self, hasher: NgramHasher, num_slots: int, device: str | torch.device = "cpu"):
        cfg = hasher.cfg
        device = torch.device(device)
        self.layer_ids = list(cfg.layer_ids)
        self.context = cfg.max_ngram_size - 1
        self.pad = hasher.compressed_pad_id
        self.raw_pad = cfg.pad_id

        def stacked(per_layer: dict[int, object]) -> torch.Tensor:
            return torch.as_tensor(np.stack([np.asarray(per_layer[lid], dtype=np.int64) for lid in self.layer_ids]),
                                   device=device)

        self.lookup = torch.as_tensor(hasher.ct.lookup_table, device=device)  # [V]
        self.multipliers = stacked(hasher.multipliers)  # [L, N]
        self.primes = stacked(hasher.table_sizes)  # [L, N - 1, H]
        self.offsets = stacked(hasher.head_offsets)  # [L, (N - 1) * H]
        self.history = torch.full((num_slots, self.context), self.pad, dtype=torch.int64, device=device)

    def rows(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Row ids [L, B * T, heads_total] (each head's offset added) of token_ids [B, T] after
        the history of slots [B]. Rows of a prefill batch are right-padded: positions at or past
        lengths[b] hash the pad id, so their rows are valid ones that nobody needs to read."""
        return self._hash(self._window(slots, token_ids, lengths))

    def advance(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Append each row's first lengths[b] tokens (all T without lengths) to its slot's history."""
        self._advance(slots, self._window(slots, token_ids, lengths), lengths)

    def step(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """rows() then advance(), building the step's windows once: what a runner calls per step."""
        window = self._window(slots, token_ids, lengths)
        rows = self._hash(window)
        self._advance(slots, window, lengths)
        return rows

    def reset(self, slots: torch.Tensor) -> None:
        """Start new sequences in slots: their history becomes the compressed pad id."""
        self.history.index_fill_(0, slots, self.pad)

    def _window(self, slots: torch.Tensor, token_ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Compressed ids [B, N - 1 + T]: each slot's history, then its new tokens (pad past lengths)."""
        if lengths is not None:
            positions = torch.arange(token_ids.shape[1], device=token_ids.device)
            token_ids = torch.where(positions.unsqueeze(0) < lengths.unsqueeze(1), token_ids, self.raw_pad)
        return torch.cat([self.history.index_select(0, slots), self.lookup.take(token_ids)], dim=1)

    def _hash(self, window: torch.Tensor) -> torch.Tensor:
        n_layers, n_orders, n_heads = self.primes.shape
        batch, width = window.shape
        positions = width - self.context
        grams = window.unfold(1, self.context + 1, 1).flip(-1)  # [B, T, N]: [..., k] is k tokens back
        products = grams.unsqueeze(0) * self.multipliers.view(n_layers, 1, 1, -1)  # [L, B, T, N], wraps
        mix = products.select(-1, 0)
        orders = []
        for k in range(1, n_orders + 1):
            mix = mix ^ products.select(-1, k)
            orders.append(mix)
        mixed = torch.stack(orders, dim=-1)  # orders 2..N: [L, B, T, N - 1]
        rows = mixed.unsqueeze(-1) % self.primes.view(n_layers, 1, 1, n_orders, n_heads)  # [L, B, T, N - 1, H]
        return rows.view(n_layers, batch * positions, n_orders * n_heads) + self.offsets.unsqueeze(1)

    def _advance(self, slots: torch.Tensor, window: torch.Tensor, lengths: torch.Tensor | None) -> None:
        """The last N - 1 ids of each row's history + valid new tokens become its history."""
        if lengths is None:
            last = window.narrow(1, window.shape[1] - self.context, self.context)
        else:
            offsets = torch.arange(self.context, device=window.device)
            last = window.gather(1, lengths.unsqueeze(1) + offsets.unsqueeze(0))
        self.history.index_copy_(0, slots, last)
