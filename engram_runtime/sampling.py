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


_ARGMAX_BLOCK = 1024


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> [B], the first index of each row's maximum (as max(dim=-1).indices).

    Not torch.argmax, and not one max(dim) over the whole row: on this CPU index-returning
    reductions run a scalar loop while amax vectorises. For [128, 49152] bfloat16 logits,
    argmax took 18.7 ms, max(dim=-1) 3.8 ms and amax 0.67 ms. So: each block's amax, the first
    block holding the row's maximum, and the index reduction inside that block only."""
    b, v = logits.shape
    if v % _ARGMAX_BLOCK or v < 4 * _ARGMAX_BLOCK:
        return logits.max(dim=-1).indices
    blocks = logits.reshape(b, v // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best = blocks.amax(dim=-1).max(dim=-1).indices  # [B]
    return best * _ARGMAX_BLOCK + blocks[torch.arange(b), best].max(dim=-1).indices


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> SampleResult:
    """logits [B, V] (any float dtype; converted to float32 only where needed) -> one token per row."""
    tokens = argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        idx = torch.tensor(rows)
        temp = torch.tensor([params[i].temperature for i in rows])
        scaled = logits[idx].float() / temp[:, None]
        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            scaled, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(scaled.shape[-1])[None, :]
            k = torch.tensor([k if k > 0 else scaled.shape[-1] for k in top_k])
            scaled = scaled.masked_fill(rank >= k[:, None], float("-inf"))
            probs = scaled.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            probs = probs.masked_fill(before >= torch.tensor(top_p)[:, None], 0.0)
        else:
            order = None
            probs = scaled.softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.cat([torch.rand(1, generator=generators[i], dtype=torch.float64) for i in rows])
        pick = torch.searchsorted(cdf, (u * cdf[:, -1].double()).to(cdf.dtype)[:, None]).squeeze(1)
        pick = pick.clamp_(max=cdf.shape[-1] - 1)
        # never pick a zero-probability token because of float rounding at the CDF edge
        zero = probs.gather(1, pick[:, None]).squeeze(1) <= 0
        if zero.any():
            pick[zero] = probs[zero].argmax(dim=-1)
        tokens[idx] = order.gather(1, pick[:, None]).squeeze(1) if order is not None else pick
    token_list = tokens.tolist()
    return SampleResult(token_list, _logprobs(logits, params, token_list))


def _logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[dict | None]:
    """Log-probabilities of the model's raw distribution (vLLM's convention)."""
    out: list[dict | None] = [None] * len(params)
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not rows:
        return out
    lp = torch.log_softmax(logits[torch.tensor(rows)].float(), dim=-1)
    n = max(params[i].logprobs for i in rows)
    top_v, top_i = lp.topk(max(n, 1), dim=-1) if n > 0 else (None, None)
    for j, i in enumerate(rows):
        k = params[i].logprobs
        top = {} if k == 0 else dict(zip(top_i[j, :k].tolist(), top_v[j, :k].tolist()))
        out[i] = {"token_id": tokens[i], "logprob": float(lp[j, tokens[i]]), "top": top}
    return out
