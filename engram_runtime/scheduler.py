"""Scheduler: who runs this step, within max_num_seqs, the token budget and the KV slots.

Policy (vLLM-like): every running sequence that is decoding gets its one token
first (decode latency never waits behind a long prompt); the rest of the token
budget goes to prompts, oldest first: sequences part-way through a chunked
prefill, then waiting ones as long as a KV slot is free. A prompt longer than
the remaining budget is prefilled in chunks over several steps.
Slots are handed out lowest-first so a decode batch usually covers a contiguous
slot range, which the model runner reads in place.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from engram_runtime.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, tokens this step)
    decode: list[Sequence] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_num_seqs))
        heapq.heapify(self._free_slots)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if not seq.in_prefill and budget > 0:
                batch.decode.append(seq)
                budget -= 1
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                n = min(len(seq.prompt_token_ids) - seq.num_computed, budget)
                batch.prefill.append((seq, n))
                budget -= n
        while self.waiting and self._free_slots and budget > 0:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq.prompt_token_ids), budget)
            batch.prefill.append((seq, n))
            budget -= n
        batch.decode.sort(key=lambda s: s.slot)
        return batch

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence from any queue and give its KV slot back."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            heapq.heappush(self._free_slots, seq.slot)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        seq.slot = None

    def kv_cache_usage(self) -> float:
        used = sum(s.num_computed for s in self.running)
        return used / (self.max_num_seqs * self.max_model_len)
