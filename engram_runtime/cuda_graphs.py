"""DecodeGraphs: decode steps replayed from graphs captured at start, one per padded batch size.

A GPU decode step of a small model is hundreds of short kernels whose launches cost the host
more than the GPU spends running them; a CUDA graph replays the whole step with one launch. One
graph per padded batch size (1, 2, 4, 8, ... up to max_num_seqs, as vLLM pads), captured largest
first into one shared memory pool, each over the same static inputs (token ids, slots,
positions) and keeping its outputs (logits, Engram gates) where the replay writes them. Rows past
the batch are padding: token 0 at position 0 of the cache's pad slot (ModelRunner.pad_slot).

When the Engram runner's step is device work alone (EngramRunner.graphable) the graph holds that
too: the hashing of the step's tokens, each layer's gather, decode and projection on the side
stream, the events the compute stream waits on and the layers' mixes. Otherwise the Engram steps
stay eager and so does every decode step.

On the device stand-in (offload.device.StepGraph) a "graph" calls the recorded step again on the
same static buffers, so the tests check the buffers' plumbing against eager steps.
"""
from __future__ import annotations

import time

import torch

from engram_runtime.engram_step import EngramStep
from engram_runtime.model_runner import Chunk, ModelRunner


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes: powers of two below max_batch, and max_batch."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


class DecodeGraphs:
    """Captured decode steps of `runner` (and of `engram`, an EngramRunner, when graphable)."""

    def __init__(self, runner: ModelRunner, max_batch: int, engram=None):
        self.runner, self.engram = runner, engram
        device = runner.device
        self.sizes = capture_sizes(max_batch)
        largest = self.sizes[-1]
        self.inputs = torch.zeros(3, largest, dtype=torch.long, device=device.torch_device)  # ids, slots, positions
        self._host = device.alloc_host((3, largest), torch.long, "the decode graphs' inputs")
        self._outputs: dict[int, tuple[torch.Tensor, EngramStep | None]] = {}
        self._graphs = {}
        t0 = time.perf_counter()
        pool = None
        self._fill([])
        for size in reversed(self.sizes):
            graph = device.graph(pool)
            graph.capture(lambda size=size: self._step(size))
            pool = graph.pool
            self._graphs[size] = graph
        if engram is not None:
            engram.backends[0].forget_touched()  # the captures' padding rows were no lookups
        self.capture_seconds = time.perf_counter() - t0

    def _step(self, size: int) -> None:
        """The recorded step: static inputs in, logits [size, vocab] (and the hook) out."""
        ids, slots, positions = (self.inputs.select(0, k).narrow(0, 0, size) for k in range(3))
        runner = self.runner
        attn = runner.decode_inputs(slots, positions, runner.model.cache_len)
        hook = self.engram.capture(slots, ids.view(size, 1)) if self.engram is not None else None
        logits = runner.model(ids.view(size, 1), attn, torch.arange(size, device=ids.device), hook)
        self._outputs[size] = (logits, hook)

    def takes(self, chunks: list[Chunk]) -> bool:
        return len(chunks) <= self.sizes[-1] and all(len(c.token_ids) == 1 for c in chunks)

    def _fill(self, chunks: list[Chunk]) -> int:
        """Write the chunks, then padding, into the static inputs; returns the padded size."""
        size = next(s for s in self.sizes if s >= len(chunks))
        host = self._host.numpy()
        host[:, :size] = ((0,), (self.runner.pad_slot,), (0,))
        for b, c in enumerate(chunks):
            host[:, b] = (c.token_ids[0], c.slot, c.start_pos)
        self.inputs.narrow(1, 0, size).copy_(self._host.narrow(1, 0, size), non_blocking=self.runner.device.pinned)
        return size

    @torch.inference_mode()
    def run(self, chunks: list[Chunk]) -> tuple[torch.Tensor, EngramStep | None]:
        """Replay the step of the chunks' padded size: (logits [B, vocab], the Engram hook, whose
        gates() are the replay's and whose finish() reads the step's timings)."""
        size = self._fill(chunks)
        self._graphs[size].replay()
        logits, hook = self._outputs[size]
        return logits.narrow(0, 0, len(chunks)), hook
