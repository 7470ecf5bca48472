"""What to send and when: prompt datasets and the arrival schedule.

The schedule follows vLLM's ``benchmark_serving``: inter-arrival gaps are drawn
from a gamma distribution with shape ``burstiness`` and mean ``1 / rate``, so
burstiness 1 is a Poisson process, < 1 burstier, > 1 more regular, at the same
mean rate.  Prompts and the schedule are drawn from seeded generators so two
runs (or two server configurations in ``compare``) see the identical workload.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A small built-in set: varied lengths and topics, no download needed.
BUILTIN_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in simple words how a hash table works.",
    "List three facts about the planet Mars.",
    "Once upon a time, in a small village at the foot of the mountains,",
    "Translate to French: The weather is nice today.",
    "What is the difference between a process and a thread?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "def fibonacci(n):",
    "Give me a recipe for a quick vegetable soup.",
    "Why is the sky blue?",
    "The New York Stock Exchange is located on",
    "Describe the water cycle for a ten-year-old.",
    "Alexander the Great was born in",
    "Write an email asking a colleague to review a pull request.",
    "How do vaccines train the immune system?",
]


class WorkloadError(ValueError):
    """A dataset cannot be read or the workload parameters make no sense."""


@dataclass
class SampleRequest:
    """One request of the workload.

    ``prompt`` is text or a list of token ids (random prompts are sent as ids so
    their length is exact without a tokenizer on the client); ``prompt_len`` is
    known only for token-id prompts, otherwise the server's ``usage`` tells.
    """

    prompt: str | list[int]
    output_len: int
    prompt_len: int | None = None


@dataclass
class WorkloadConfig:
    dataset: str = "random"  # "random", "builtin" or a path to a .txt / .jsonl file
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly in [L*(1-r), L*(1+r)]
    token_low: int = 1000  # random token ids are drawn from [token_low, token_high):
    token_high: int = 30000  # away from special tokens (ids < ~20 for most vocabularies)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise WorkloadError(f"num_prompts must be >= 1, got {self.num_prompts}")
        if self.input_len < 1 or self.output_len < 1:
            raise WorkloadError("input_len and output_len must be >= 1")
        if not 0.0 <= self.range_ratio < 1.0:
            raise WorkloadError(f"range_ratio must be in [0, 1), got {self.range_ratio}")
        if not 0 <= self.token_low < self.token_high:
            raise WorkloadError(f"bad random token range [{self.token_low}, {self.token_high})")


def _lengths(rng: np.random.Generator, mean: int, ratio: float, n: int) -> np.ndarray:
    low = max(1, int(mean * (1 - ratio)))
    high = max(low, int(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def _read_prompts(path: Path) -> list[dict]:
    """Prompts from a text file (one per non-empty line) or JSONL (``prompt`` field,
    optional ``output_len`` or ``max_tokens``)."""
    if not path.is_file():
        raise WorkloadError(f"dataset file not found: {path}")
    rows: list[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkloadError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise WorkloadError(f"{path}:{lineno}: needs a string field 'prompt'")
            out = obj.get("output_len", obj.get("max_tokens"))
            rows.append({"prompt": obj["prompt"], "output_len": int(out) if out else None})
    else:
        rows = [{"prompt": line, "output_len": None} for line in lines if line.strip()]
    if not rows:
        raise WorkloadError(f"dataset file has no prompts: {path}")
    return rows


def build_requests(cfg: WorkloadConfig) -> list[SampleRequest]:
    """The workload's requests, identical for identical configs."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_prompts
    out_lens = _lengths(rng, cfg.output_len, cfg.range_ratio, n)
    if cfg.dataset == "random":
        in_lens = _lengths(rng, cfg.input_len, cfg.range_ratio, n)
        return [
            SampleRequest(
                prompt=rng.integers(cfg.token_low, cfg.token_high, size=int(k)).tolist(),
                output_len=int(o),
                prompt_len=int(k),
            )
            for k, o in zip(in_lens, out_lens)
        ]
    if cfg.dataset == "builtin":
        rows = [{"prompt": p, "output_len": None} for p in BUILTIN_PROMPTS]
    else:
        rows = _read_prompts(Path(cfg.dataset))
    order = rng.permutation(len(rows))
    picks = [rows[order[i % len(rows)]] for i in range(n)]
    return [
        SampleRequest(prompt=r["prompt"], output_len=r["output_len"] or int(o))
        for r, o in zip(picks, out_lens)
    ]


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (seconds after the start) of ``n`` requests.

    The first request goes at 0, as in vLLM; gaps are gamma(shape=burstiness,
    scale=1/(rate*burstiness)), whose mean is 1/rate whatever the burstiness.
    ``rate = inf`` sends everything at once.
    """
    if rate <= 0:
        raise WorkloadError(f"request rate must be > 0 (or inf), got {rate}")
    if burstiness <= 0:
        raise WorkloadError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return np.zeros(n)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])
