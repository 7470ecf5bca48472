"""One request's life inside the engine: tokens, KV slot, text, stop checks.

Text is detokenised incrementally (vLLM's prefix/read offsets): only the tail of
the ids is decoded per step, and a trailing U+FFFD (half of a multi-byte
character) waits for the next token. With stop strings, the last
len(longest stop) - 1 characters are held back until they cannot start a stop
string, so a stop string is never streamed out and then retracted.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engram_runtime.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """One delta per engine step per request (see contracts: engine)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[dict] | None = None
    gates: list[dict[int, float]] | None = None
    arrival_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    error: str | None = None


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        # a few prompt ids as left context: some tokenizers decode a token differently at the start
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]


@dataclass(eq=False)  # identity semantics: queues remove *this* sequence
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    on_output: Callable[[RequestOutput], None]
    detokenizer: IncrementalDetokenizer
    eos_token_ids: frozenset[int]
    generator: torch.Generator
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    slot: int | None = None
    num_computed: int = 0  # tokens whose K/V are in the cache
    output_token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all output text so far (after stop truncation)
    emitted_chars: int = 0
    finish_reason: str | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_token_ids)

    def pending_token_ids(self) -> list[int]:
        """Tokens not yet in the KV cache (the prompt rest, or the last sampled token)."""
        return self.all_token_ids[self.num_computed :]

    def append_token(self, token_id: int, max_model_len: int) -> None:
        """Record a sampled token, extend the text and decide whether we are done."""
        self.output_token_ids.append(token_id)
        p = self.params
        if (not p.ignore_eos and token_id in self.eos_token_ids) or token_id in p.stop_token_ids:
            self.finish_reason = "stop"
            return  # like vLLM: a stop token is in token_ids but adds no text
        self.text += self.detokenizer.add([token_id])
        if p.stop and self._truncate_at_stop():
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= p.max_tokens or self.num_tokens >= max_model_len:
            self.finish_reason = "length"

    def _truncate_at_stop(self) -> bool:
        longest = max(len(s) for s in self.params.stop)
        start = max(0, self.emitted_chars - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def take_new_text(self) -> str:
        """Text that is safe to stream now."""
        end = len(self.text)
        if self.finish_reason is None and self.params.stop:
            end -= max(len(s) for s in self.params.stop) - 1
        if end <= self.emitted_chars:
            return ""
        new = self.text[self.emitted_chars : end]
        self.emitted_chars = end
        return new
