"""EngramRunner: a step's Engram work, the Engram counterpart of ModelRunner.

It owns what the Engram layers need across steps: the layers and their serving weights, the
N-gram hasher, the tables (offload's TableSet: storage only, handed row ids), the conv state of
every KV slot, and the backends that fetch a step's rows ahead of the forward. ``submit`` hands
a step's tokens to the first backend that takes it and returns the step's hook (EngramStep)
at once; the forward calls the hook at each Engram layer. This is the one place that picks a
backend:

- ``DeviceEngram`` (device_engram.py): on CUDA, for tables the GPU reads itself (in its memory,
  or page-locked host memory through UVA): hashing, gathers and projections on a side stream,
  device work alone, so a decode step can be one CUDA graph (``capture``);
- ``NativePrefetcher`` (native_prefetch.py): on the CPU, decode-size steps over tables in CPU
  memory, a C++ thread that hashes, gathers and projects, and mixes a decode step in one call;
- ``Prefetcher`` (prefetch.py): any other step and placement (mmap, a row cache, host tables
  copied through staging on CUDA), a Python thread over offload's gathers (inline with prefetch
  off), in portable torch ops.
"""
from __future__ import annotations

import logging
import os

import torch

from engram_runtime.checkpoint import load_checkpoint
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.device_engram import DeviceEngram
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_step import EngramStep, ServingWeights, StepTokens
from engram_runtime.hashing import NgramHasher
from engram_runtime.model_runner import Chunk, ModelRunner
from engram_runtime.native_prefetch import NativePrefetcher
from engram_runtime.prefetch import Prefetcher
from offload.store import HOST_PLACEMENTS, TableSet
from offload.tablefile import TableFileError

log = logging.getLogger(__name__)
HOST_READS = ("uva", "staging")  # how a GPU reads tables in host memory: itself, or copies staged by CPU threads


def _core_left_for_prefetch() -> bool:
    """On the CPU a prefetch thread pays only with a core of its own: beside compute threads on
    every core it deschedules one of them, and every parallel op of the step then waits for
    that one (docs/performance.md, "Compute threads")."""
    left = len(os.sched_getaffinity(0)) > torch.get_num_threads()
    if not left:
        log.info("engram rows fetched inline: the compute threads use every core")
    return left


class EngramRunner:
    def __init__(self, layers: dict[int, EngramLayer], hasher: NgramHasher, tables: TableSet, num_slots: int,
                 dtype: torch.dtype, prefetch: bool | None = None, host_read: str = "uva"):
        """layers: float32 EngramLayers (mix() is a few small ops on the float32 residual stream),
        moved to the tables' compute device; num_slots: every per-slot state's rows (the model
        runner's cache_slots); dtype: the backbone's, in which the projections, the layers' only
        matmuls, run; prefetch: rows fetched ahead on a side thread or stream (None: on a GPU, and
        on the CPU where a core is left for the thread); host_read: on CUDA, how host tables are
        read (HOST_READS)."""
        if host_read not in HOST_READS:
            raise ValueError(f"host_read must be one of {HOST_READS}, got {host_read!r}")
        self.device = tables.device
        dev = self.device.torch_device
        self.layers = {lid: layer.to(dev) for lid, layer in layers.items()}
        self.hasher, self.tables, self.dtype = hasher, tables, dtype
        self.layer_ids = sorted(layers)
        self.table_stats = tables.stats
        self.ngram = hasher.cfg.max_ngram_size
        self.conv_states = {lid: layer.new_conv_state(num_slots) for lid, layer in self.layers.items()}
        self.weights: dict[int, ServingWeights] = {}
        self.backends: list[DeviceEngram | NativePrefetcher | Prefetcher] = []
        if prefetch is None:
            prefetch = self.device.portable or _core_left_for_prefetch()
        staged = host_read == "staging" and any(tables[lid].placement in HOST_PLACEMENTS for lid in tables.layer_ids)
        if self.device.portable and not staged and DeviceEngram.supports(tables):
            self.backends.append(DeviceEngram(tables, hasher, num_slots, dtype, prefetch))
        elif prefetch and NativePrefetcher.supports(tables):
            self.backends.append(NativePrefetcher(tables, hasher))
        if not self.backends or not isinstance(self.backends[0], DeviceEngram):
            self.backends.append(Prefetcher(tables, hasher, self._project, enabled=prefetch))
        self.prepare()

    @classmethod
    def load(cls, config, tokenizer, runner: ModelRunner) -> EngramRunner:
        """config: EngineConfig (engram dir, placement, cache, prefetch, verification, host read);
        `runner`: the backbone's, which the checkpoint must fit and whose device, dtype and slots
        it takes."""
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
        tables = TableSet.open(ckpt.path, ckpt.tables_manifest, placement=config.table_placement,
                               device=runner.device, compute_dtype=runner.dtype, cache_rows=config.cache_rows,
                               verify_hash=False)
        return cls(ckpt.build_layers(dtype=torch.float32), hasher, tables, runner.cache_slots, runner.dtype,
                   config.prefetch, config.engram_host_read)

    @property
    def graphable(self) -> bool:
        """Whether a decode step's Engram work is device work alone, for a CUDA graph (capture)."""
        return isinstance(self.backends[0], DeviceEngram)

    def prepare(self) -> None:
        """Make the layers' serving weights and (re)start the backends that keep them; call again
        after changing the layers' parameters."""
        self.weights.clear()
        pack = not self.device.portable
        self.weights.update({lid: ServingWeights.of(layer, self.dtype, pack) for lid, layer in self.layers.items()})
        for backend in self.backends:
            if isinstance(backend, NativePrefetcher):
                backend.start(self.weights, self.conv_states)
            elif isinstance(backend, DeviceEngram):
                backend.start(self.weights)

    def check_health(self) -> str | None:
        """Why this memory cannot be served now, in words without server paths, or None: a table
        file that the mmap tier serves from was removed or changed size (every gather of it would
        fail), or a backend's worker stopped. Cheap: readiness probes call it every few seconds."""
        for layer_id in self.tables.layer_ids:
            try:
                self.tables[layer_id].check_file()
            except TableFileError:  # its message names the file, which a readiness body must not
                return f"the Engram table of layer {layer_id} is unreadable: its file was removed or changed size"
        for backend in self.backends:
            if isinstance(backend, Prefetcher) and (problem := backend.check_health()) is not None:
                return problem
        return None

    def _project(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        return self.weights[layer_id].project(rows)

    def _index(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device.torch_device)

    def submit(self, chunks: list[Chunk], token_ids: list[list[int]]) -> EngramStep:
        """Start this forward's Engram work now and return its hook (the model's `engram`).
        token_ids[b]: chunk b's sequence so far (at least up to the chunk's last token)."""
        before = self.ngram - 1
        new_tokens = [len(c.token_ids) for c in chunks]
        step = StepTokens([ids[max(0, c.start_pos - before): c.start_pos + len(c.token_ids)]
                           for ids, c in zip(token_ids, chunks)],
                          new_tokens, [c.slot for c in chunks], [c.slot for c in chunks if c.start_pos == 0])
        if step.fresh:  # a new sequence in a reused slot starts with an empty conv state
            fresh = self._index(step.fresh)
            for states in self.conv_states.values():
                states.index_fill_(0, fresh, 0)
        backend = next(b for b in self.backends if b.takes(step))
        ticket = backend.submit(step)
        fused = max(new_tokens) == 1 and hasattr(ticket, "mix")  # the ticket mixes a decode step whole
        lengths = self._index(new_tokens) if min(new_tokens) != max(new_tokens) else None
        return EngramStep(self.layers, self.weights, self.conv_states, ticket,
                          None if fused else self._index(step.slots), lengths, fused)

    def capture(self, slots: torch.Tensor, token_ids: torch.Tensor) -> EngramStep:
        """A decode step's hook from device tensors (slots [B], token_ids [B, 1]), for a CUDA graph
        to record: needs the DeviceEngram backend (graphable)."""
        ticket = self.backends[0].launch(slots, token_ids, in_graph=True)
        return EngramStep(self.layers, self.weights, self.conv_states, ticket, slots, None)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.tables.close()
