"""How many sequences' KV caches fit on a GPU, as vLLM's --gpu-memory-utilization decides it.

The engine may use `utilization` of the device's memory. Other processes' use is what was taken
before this engine started; the model's own peak (weights and the activations of the largest
step the scheduler can make) is measured by a profiling forward with a one-slot cache; what
remains holds KV caches of max_model_len positions each. A request that cannot fit then meets
the scheduler's limits (400 for a prompt over max_model_len, 429 when the queue is full), never
an out-of-memory error mid-step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvBudget:
    """The figures of one sizing, for the start-up log and /version."""

    slots: int
    bytes_per_sequence: int
    cache_bytes: int
    free_bytes: int  # of the budget, after the cache


def bytes_per_sequence(num_layers: int, kv_heads: int, head_dim: int, positions: int, dtype: torch.dtype) -> int:
    """K and V of every layer for one slot of `positions` positions."""
    return 2 * num_layers * kv_heads * head_dim * positions * torch.empty(0, dtype=dtype).element_size()


def fit_slots(total: int, used_by_others: int, model_peak: int, per_sequence: int, utilization: float,
              wanted: int) -> KvBudget:
    """Slots that fit in total * utilization after other processes' memory and the model's peak,
    at most `wanted` (max_num_seqs); refuses a budget with room for none."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization}")
    budget = int(total * utilization) - used_by_others - model_peak
    fits = max(0, budget) // per_sequence
    if fits < 1:
        raise ValueError(
            f"no room for a KV cache: {total / 2**30:.2f} GiB x gpu_memory_utilization {utilization} leaves "
            f"{budget / 2**30:.2f} GiB after other processes ({used_by_others / 2**30:.2f} GiB) and the model "
            f"({model_peak / 2**30:.2f} GiB), and one sequence of max_model_len needs "
            f"{per_sequence / 2**30:.3f} GiB; lower --max-model-len or raise --gpu-memory-utilization")
    slots = min(wanted, fits)
    return KvBudget(slots, per_sequence, slots * per_sequence, budget - slots * per_sequence)


def profile_slots(runner, max_num_batched_tokens: int, used_by_others: int, utilization: float,
                  wanted: int) -> KvBudget:
    """Measure the model's peak with a profiling prefill of the largest step's tokens (runner: a
    ModelRunner holding a one-slot cache), then size the cache (CUDA only)."""
    from engram_runtime.model_runner import Chunk  # noqa: PLC0415 - model_runner imports this module

    device = runner.device.torch_device
    torch.cuda.reset_peak_memory_stats(device)
    runner.forward([Chunk(0, [0] * min(max_num_batched_tokens, runner.max_model_len), 0)])
    torch.cuda.synchronize(device)
    cache = bytes_per_sequence(runner.config.num_hidden_layers, runner.config.num_key_value_heads,
                               runner.config.head_dim, runner.max_model_len + 1, runner.cache_dtype)
    budget = fit_slots(torch.cuda.mem_get_info(device)[1], used_by_others, torch.cuda.max_memory_allocated(device),
                       cache, utilization, wanted)
    log.info("KV cache: %d sequences of %d tokens fit (%.2f GiB, %.1f MiB each) at gpu_memory_utilization %.2f",
             budget.slots, runner.max_model_len, budget.cache_bytes / 2**30, cache / 2**20, utilization)
    return budget
