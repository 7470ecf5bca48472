"""SamplingParams and the batched sampler.

Every request owns a torch.Generator; per step it draws exactly one uniform
number, and the token is found by inverse-CDF over the (temperature-scaled,
top-k/top-p-filtered) distribution. So a request's output depends only on its
seed and its logits, never on which other requests share the batch, and the
expensive parts (softmax, sort, cumsum) run once over the whole batch.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # 0 or -1: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives per token (0 = only the chosen)
    engram_gates: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        if self.max_tokens is None or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is None or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or >= 1, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def make_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else secrets.randbits(63))
        return g


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict | None]  # per row: {"token_id", "logprob", "top": {id: lp}} or None
    extra: list[list[float]] | None = None  # per row: the `extra` columns handed to sample()


_BLOCK = 1024  # values per block of a row, for argmax and inverse_cdf on the CPU


def _blocked(x: torch.Tensor) -> bool:
    """Whether a [B, V] row-wise scan of x runs by blocks: on the CPU, for rows of whole blocks."""
    v = x.shape[-1]
    return x.device.type == "cpu" and v % _BLOCK == 0 and v >= 4 * _BLOCK


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B], the first index of each row's maximum (as max(dim=-1).indices).

    On the CPU not one index reduction over the whole row: there index-returning reductions run a
    scalar loop while amax vectorises. So: each block's amax, the first block holding the row's
    maximum, and the index reduction inside that block only."""
    b, v = logits.shape
    if not _blocked(logits):
        return logits.max(dim=-1).indices
    blocks = logits.reshape(b, v // _BLOCK, _BLOCK)
    best = blocks.amax(dim=-1).max(dim=-1).indices  # [B]
    return best * _BLOCK + blocks[torch.arange(b), best].max(dim=-1).indices


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [R, V] (non-negative, any total), u [R] float64 in [0, 1) -> [R]: the first index whose
    running sum reaches u * the row's total.

    On the CPU not a cumulative sum of the whole row, a sequential scan there: each block's sum,
    the block where the running sum of those reaches the target, and the scan inside that block
    only (running sums in float64)."""
    r, v = probs.shape
    if not _blocked(probs):
        cdf = probs.cumsum(dim=-1)
        target = (u * cdf[:, -1].double()).to(cdf.dtype)
        return torch.searchsorted(cdf, target[:, None]).squeeze(1).clamp_(max=v - 1)
    blocks = probs.view(r, v // _BLOCK, _BLOCK)
    sums = blocks.sum(dim=-1).double()
    ends = sums.cumsum(dim=-1)
    target = u * ends[:, -1]
    block = torch.searchsorted(ends, target[:, None]).clamp_(max=ends.shape[1] - 1)  # [R, 1]
    start = ends.gather(1, block) - sums.gather(1, block)
    inside = blocks[torch.arange(r), block.squeeze(1)].double().cumsum(dim=-1)
    pick = torch.searchsorted(inside, target[:, None] - start).squeeze(1).clamp_(max=_BLOCK - 1)
    return block.squeeze(1) * _BLOCK + pick


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           extra: torch.Tensor | None = None) -> SampleResult:
    """logits [B, V] (any float dtype, on any device; converted to float32 only where needed) ->
    one token per row. Everything is computed where the logits are, and what the host needs (the
    tokens, the logprobs asked for, and `extra` [B, E], e.g. the step's Engram gates) comes back
    in one copy: on a GPU the step's one device-to-host transfer. Each request's uniform draw
    comes from its own CPU generator, so a seed samples the same on every device."""
    device = logits.device
    tokens = argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows, device=device)
        temps = [params[i].temperature for i in rows]
        scaled = (logits if len(rows) == len(params) else logits.index_select(0, idx)).float()
        if any(t != 1.0 for t in temps):
            scaled = scaled / torch.tensor(temps, device=device)[:, None]
        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        order = None
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(scaled.shape[-1], device=device)[None, :]
            k = torch.tensor([k if k > 0 else scaled.shape[-1] for k in top_k], device=device)
            scaled = scaled.masked_fill(rank >= k[:, None], float("-inf"))
            probs = scaled.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            probs = probs.masked_fill(before >= torch.tensor(top_p, device=device)[:, None], 0.0)
        else:
            probs = scaled.softmax(dim=-1)
        u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in rows]).to(device)
        pick = inverse_cdf(probs, u)
        # never pick a zero-probability token because of float rounding at the CDF edge: take the
        # likeliest instead, the first of the sorted order or the row's argmax
        zero = probs.gather(1, pick[:, None]).squeeze(1) <= 0
        if order is not None:
            pick = order.gather(1, torch.where(zero, 0, pick)[:, None]).squeeze(1)
        else:
            pick = torch.where(zero, tokens.index_select(0, idx), pick)
        tokens.index_copy_(0, idx, pick)
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    top_n = max([params[i].logprobs for i in lp_rows], default=0)
    columns = [tokens[:, None].double()]
    if lp_rows:
        columns.append(_logprob_columns(logits, tokens, lp_rows, top_n))
    if extra is not None:
        columns.append(extra.double())
    host = (torch.cat(columns, dim=1) if len(columns) > 1 else columns[0]).tolist()
    token_list = [int(row[0]) for row in host]
    logprobs: list[dict | None] = [None] * len(params)
    for i in lp_rows:
        row, k = host[i], params[i].logprobs
        top_ids, top_lps = row[2:2 + top_n], row[2 + top_n:2 + 2 * top_n]
        logprobs[i] = {"token_id": token_list[i], "logprob": row[1],
                       "top": {int(t): lp for t, lp in zip(top_ids[:k], top_lps[:k])}}
    width = 1 + (1 + 2 * top_n if lp_rows else 0)
    return SampleResult(token_list, logprobs, [row[width:] for row in host] if extra is not None else None)


def _logprob_columns(logits: torch.Tensor, tokens: torch.Tensor, rows: list[int], top_n: int) -> torch.Tensor:
    """[B, 1 + 2 * top_n] float64, filled at `rows`: the chosen token's log-probability under the
    model's raw distribution (vLLM's convention), then the top_n ids and their log-probabilities."""
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    parts = [lp.gather(1, tokens.index_select(0, idx)[:, None])]
    if top_n:
        top_v, top_i = lp.topk(top_n, dim=-1)
        parts += [top_i.double(), top_v]
    out = torch.zeros(len(tokens), 1 + 2 * top_n, dtype=torch.float64, device=logits.device)
    return out.index_copy_(0, idx, torch.cat([p.double() for p in parts], dim=1))
