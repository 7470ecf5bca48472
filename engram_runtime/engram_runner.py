"""EngramRunner: a step's Engram work, the Engram counterpart of ModelRunner.

It owns what the Engram layers need across steps: the layers and their serving weights, the
N-gram hasher, the tables (offload's TableSet: storage only, handed row ids), the conv state of
every KV slot, and the backends that fetch a step's rows ahead of the forward. ``submit`` hands
a step's tokens to the first backend that takes it and returns the step's hook (EngramStep)
at once; the forward calls the hook at each Engram layer. This is the one place that picks a
backend:

- ``NativePrefetcher`` (native_prefetch.py): decode-size steps over tables in CPU memory, a
  C++ thread that hashes, gathers and projects, and mixes a decode step in one call;
- ``Prefetcher`` (prefetch.py): any step and placement, a Python thread (or inline with
  prefetch off) over offload's gathers, in portable torch ops.
"""
from __future__ import annotations

import torch

from engram_runtime.checkpoint import load_checkpoint
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_step import EngramStep, ServingWeights, StepTokens
from engram_runtime.hashing import NgramHasher
from engram_runtime.model_runner import Chunk, ModelRunner
from engram_runtime.native_prefetch import NativePrefetcher
from engram_runtime.prefetch import Prefetcher
from offload.store import TableSet


class EngramRunner:
    def __init__(self, layers: dict[int, EngramLayer], hasher: NgramHasher, tables: TableSet, num_slots: int,
                 dtype: torch.dtype, prefetch: bool = True):
        """layers: float32 EngramLayers (mix() is a few small ops on the float32 residual stream);
        dtype: the backbone's, in which the projections, the layers' only matmuls, run."""
        self.layers, self.hasher, self.tables, self.dtype = layers, hasher, tables, dtype
        self.layer_ids = sorted(layers)
        self.table_stats = tables.stats
        self.ngram = hasher.cfg.max_ngram_size
        self.conv_states = {lid: layer.new_conv_state(num_slots) for lid, layer in layers.items()}
        self.weights: dict[int, ServingWeights] = {}
        self.backends: list[NativePrefetcher | Prefetcher] = []
        if prefetch and NativePrefetcher.supports(tables):
            self.backends.append(NativePrefetcher(tables, hasher))
        self.backends.append(Prefetcher(tables, hasher, self._project, enabled=prefetch))
        self.prepare()

    @classmethod
    def load(cls, config, tokenizer, runner: ModelRunner) -> "EngramRunner":
        """config: EngineConfig (engram dir, placement, cache, prefetch, verification); `runner`:
        the backbone's, which the checkpoint must fit and whose dtype and slots it takes."""
        ckpt = load_checkpoint(config.engram, verify_tables=config.verify_tables)
        mc = runner.config
        ckpt.check_backbone(mc.hidden_size, mc.num_hidden_layers, mc.vocab_size)
        if config.table_dtype is not None:
            stored = {e["dtype"] for e in ckpt.tables_manifest.values()}
            if stored != {config.table_dtype}:
                raise ValueError(
                    f"Engram checkpoint {config.engram} stores tables as {sorted(stored)}, not "
                    f"{config.table_dtype}; convert it first with `engram-convert --dtype {config.table_dtype}`"
                )
        hasher = NgramHasher(ckpt.config, CompressedTokenizer.from_tokenizer(tokenizer))
        tables = TableSet.open(ckpt.path, ckpt.tables_manifest, placement=config.table_placement, device="cpu",
                               compute_dtype=runner.dtype, cache_rows=config.cache_rows, verify_hash=False)
        return cls(ckpt.build_layers(dtype=torch.float32), hasher, tables, runner.num_slots, runner.dtype,
                   config.prefetch)

    def prepare(self) -> None:
        """Make the layers' serving weights and (re)start the backends that keep them; call again
        after changing the layers' parameters."""
        self.weights.clear()
        self.weights.update({lid: ServingWeights.of(layer, self.dtype) for lid, layer in self.layers.items()})
        for backend in self.backends:
            if isinstance(backend, NativePrefetcher):
                backend.start(self.weights, self.conv_states)

    def _project(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        return self.weights[layer_id].project(rows)

    def submit(self, chunks: list[Chunk], token_ids: list[list[int]]) -> EngramStep:
        """Start this forward's Engram work now and return its hook (the model's `engram`).
        token_ids[b]: chunk b's sequence so far (at least up to the chunk's last token)."""
        before = self.ngram - 1
        step = StepTokens([ids[max(0, c.start_pos - before): c.start_pos + len(c.token_ids)]
                           for ids, c in zip(token_ids, chunks)],
                          [len(c.token_ids) for c in chunks], [c.slot for c in chunks])
        backend = next(b for b in self.backends if b.takes(step))
        ticket = backend.submit(step)
        fresh = [c.slot for c in chunks if c.start_pos == 0]
        if fresh:  # a new sequence in a reused slot starts with an empty conv state
            for states in self.conv_states.values():
                states[fresh] = 0
        return EngramStep(self.layers, self.weights, self.conv_states, ticket, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.tables.close()
