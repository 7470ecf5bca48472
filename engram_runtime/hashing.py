"""NgramHasher: token ids -> Engram table row ids, bit-exact with DeepSeek's reference.

Row ids depend on token ids alone (no hidden state), which is what lets the
offload layer fetch rows before the backbone reaches the Engram layer. The
arithmetic (odd multipliers, int64 wrap-around, XOR mix, modulo a per-head prime)
must match the reference bit for bit, or checkpoints trained with the reference
layout read the wrong rows. Everything is vectorised over batch, positions,
layers and heads; the only Python loops run over the N-gram order. Where the
native kernels are built, one call (engram_kernels.ngram_rows) does it all: the
engine hashes every step, where a dozen array ops would cost more than the rest of
Engram's work.
"""
from __future__ import annotations

import numpy as np
import torch

import engram_kernels as kernels

from .compression import CompressedTokenizer
from .engram_config import EngramConfig

# Seeds of the per-layer multiplier generators are spread by this prime (reference value).
_LAYER_SEED_STRIDE = 10007
# Deterministic Miller-Rabin witnesses: correct for every n < 3.3e24, far beyond any table size.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Deterministic primality test for table sizes (avoids a sympy dependency)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def table_sizes_for(cfg: EngramConfig) -> dict[int, list[list[int]]]:
    """Per layer, per order 2..N, per head: the head's prime table size.

    Needs only the config (not the tokenizer), so a checkpoint's table shapes can be
    validated before the tokenizer is loaded. Primes are searched upward from
    engram_vocab_size[n-2], each head starting after the previous head's prime, and
    a prime is never reused anywhere (layers are visited in config order).
    """
    used: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer_id in cfg.layer_ids:
        per_order = []
        for order in range(2, cfg.max_ngram_size + 1):
            candidate = cfg.engram_vocab_size[order - 2]
            heads = []
            for _ in range(cfg.n_head_per_ngram):
                while candidate in used or not is_prime(candidate):
                    candidate += 1
                used.add(candidate)
                heads.append(candidate)
                candidate += 1
            per_order.append(heads)
        sizes[layer_id] = per_order
    return sizes


def head_offsets_for(table_sizes: list[list[int]]) -> np.ndarray:
    """Exclusive cumulative sum of one layer's flattened head sizes: each head's first row in the table file."""
    flat = np.array([p for heads in table_sizes for p in heads], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(flat)[:-1]]).astype(np.int64)


class NgramHasher:
    """Hashes raw token ids into within-head row ids for every Engram layer.

    Attributes (per layer id): table_sizes (primes, [order][head]), multipliers
    (np.int64 [max_ngram_size]), head_offsets (np.int64 [heads_total]), num_rows.
    """

    def __init__(self, cfg: EngramConfig, ct: CompressedTokenizer):
        self.cfg = cfg
        self.ct = ct
        if not 0 <= cfg.pad_id < ct.vocab_size:
            raise ValueError(f"EngramConfig.pad_id {cfg.pad_id} is outside the tokenizer vocabulary ({ct.vocab_size})")
        # Padding before the sequence start uses the *compressed* pad id, as the reference does.
        self.compressed_pad_id = int(ct.lookup_table[cfg.pad_id])
        half_bound = max(1, (np.iinfo(np.int64).max // len(ct)) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for layer_id in cfg.layer_ids:
            rng = np.random.default_rng(int(cfg.seed + _LAYER_SEED_STRIDE * layer_id))
            r = rng.integers(low=0, high=half_bound, size=(cfg.max_ngram_size,), dtype=np.int64)
            self.multipliers[layer_id] = r * 2 + 1
        self.table_sizes = table_sizes_for(cfg)
        self.head_offsets = {lid: head_offsets_for(s) for lid, s in self.table_sizes.items()}
        self.num_rows = {lid: int(sum(map(sum, s))) for lid, s in self.table_sizes.items()}
        # Stacked forms for the vectorised kernel: [L, N] multipliers, [L, N-1, H] primes.
        self._mult = np.stack([self.multipliers[lid] for lid in cfg.layer_ids])
        self._primes = np.array([self.table_sizes[lid] for lid in cfg.layer_ids], dtype=np.int64)
        head_offsets = np.stack([self.head_offsets[lid] for lid in cfg.layer_ids])  # [L, (N-1)*H]
        self._offsets = {False: np.zeros_like(head_offsets), True: head_offsets}  # by global_ids
        # the native kernel's tensors, made once: from_numpy per call is a cold call per step
        self._lookup_t = torch.from_numpy(ct.lookup_table)
        self._mult_t, self._primes_t = torch.from_numpy(self._mult), torch.from_numpy(self._primes)
        self._offsets_t = {k: torch.from_numpy(v) for k, v in self._offsets.items()}

    def step_rows(self, contexts: list[list[int]], new_tokens: list[int]) -> dict[int, np.ndarray]:
        """Global row ids [B * T, heads_total] per layer for a step's B rows, right-padded to the
        longest row's T: contexts[b] is row b's new_tokens[b] new tokens after up to N - 1 tokens
        before them (fewer at the sequence start, which is left-padded like the reference), so
        chunked prefill and decode hash exactly like one pass over the sequence. The native
        prefetch worker does the same with kernel_args (csrc/row_prefetch.cpp)."""
        skip = self.cfg.max_ngram_size - 1
        windows = np.full((len(contexts), skip + max(new_tokens)), self.cfg.pad_id, dtype=np.int64)
        for b, (ctx, new) in enumerate(zip(contexts, new_tokens)):
            lead = skip + new - len(ctx)
            windows[b, lead : lead + len(ctx)] = ctx
        hashed = self.hash(windows, context=skip, global_ids=True)
        return {lid: h.reshape(-1, h.shape[-1]) for lid, h in hashed.items()}

    def kernel_args(self, layer_ids: list[int]) -> kernels.HashArgs:
        """step_rows of `layer_ids`, in that order, as data for the native prefetch worker."""
        order = [self.cfg.layer_ids.index(lid) for lid in layer_ids]
        return kernels.HashArgs(self._lookup_t, self.compressed_pad_id, torch.from_numpy(self._mult[order]),
                                torch.from_numpy(self._primes[order]), torch.from_numpy(self._offsets[True][order]),
                                self.cfg.pad_id, self.cfg.max_ngram_size - 1)

    def _rows(self, shifted: np.ndarray) -> dict[int, np.ndarray]:
        """shifted[k] holds the compressed id k positions back ([N, B, T]) -> {layer: [B, T, heads_total]}."""
        n_layers, n_orders, n_heads = self._primes.shape
        # [L, N, B, T]; int64 products wrap around exactly like the reference's numpy arithmetic.
        products = shifted[None, :, :, :] * self._mult[:, :, None, None]
        mix = np.bitwise_xor.accumulate(products, axis=1)[:, 1:]  # orders 2..N: [L, N-1, B, T]
        rows = mix[..., None] % self._primes[:, :, None, None, :]  # [L, N-1, B, T, H]
        _, _, b, t, _ = rows.shape
        rows = rows.transpose(0, 2, 3, 1, 4).reshape(n_layers, b, t, n_orders * n_heads)
        return {lid: rows[i] for i, lid in enumerate(self.cfg.layer_ids)}

    def hash(self, token_ids, *, context: int = 0, global_ids: bool = False) -> dict[int, np.ndarray]:
        """Raw ids [B, T] -> {layer_id: np.int64 [B, T - context, heads_total]} row ids within each
        head; with global_ids, in the layer's whole table (each head's offset added). The first
        `context` positions only serve as their successors' predecessors (the engine passes a
        row's N-1 previous tokens this way); positions before the sequence start are padding."""
        ids = np.asarray(token_ids)
        if ids.ndim != 2:
            raise ValueError(f"NgramHasher.hash expects token ids of shape [B, T], got {ids.shape}")
        if not 0 <= context <= ids.shape[1]:
            raise ValueError(f"NgramHasher.hash: context {context} outside the {ids.shape[1]} positions")
        if kernels.available():
            rows = kernels.ngram_rows(torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)), self._lookup_t,
                                      self.compressed_pad_id, self._mult_t, self._primes_t,
                                      self._offsets_t[global_ids], context).numpy()
            return dict(zip(self.cfg.layer_ids, rows))
        offsets = self._offsets[global_ids]
        c = self.ct(ids)
        n = self.cfg.max_ngram_size
        b, t = c.shape
        padded = np.concatenate([np.full((b, n - 1), self.compressed_pad_id, dtype=np.int64), c], axis=1)
        shifted = np.stack([padded[:, n - 1 - k: n - 1 - k + t] for k in range(n)])
        return {lid: rows[:, context:] + offsets[i] for i, (lid, rows) in enumerate(self._rows(shifted).items())}
