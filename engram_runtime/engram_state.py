"""The engine's Engram side: checkpoint, hasher, tables + prefetcher, per-slot conv state.

Per step the engine hands over the rows it is about to run; we submit each row's
new tokens (with its N-1 previous tokens as context, so chunked prefill and
decode hash exactly like one pass over the sequence) to the prefetcher at once,
which hashes them into row ids (on its native worker, for a decode step). Its
worker gathers each layer's rows and computes the layer's token-only half from
them (EngramLayer.memory: the key and value projections). The hook returned to
the decoder blocks waits for that result at the Engram layer, runs the half that
needs the hidden state (EngramLayer.mix) with the batch's conv states (kept per
KV slot), adds it to the residual stream and records the gates.
"""
from __future__ import annotations

import numpy as np
import torch

import engram_kernels as kernels
from engram_runtime.checkpoint import load_checkpoint
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.hashing import NgramHasher
from engram_runtime.model_runner import ModelRunner, Row
from offload.prefetch import NativeTicket, Prefetcher, Projection, Ticket
from offload.store import TableSet


class EngramStepHook:
    """Called by the decoder blocks as `engram(layer_id, hidden [B, T, D])` -> hidden + the
    Engram layer's output [B, T, D]."""

    def __init__(self, runtime: "EngramRuntime", ticket: Ticket, lengths: list[int], slots: list[int]):
        """lengths, slots: per row, how many new tokens it runs and its KV slot."""
        self.runtime, self.ticket = runtime, ticket
        padded = min(lengths) != max(lengths)  # right-padded rows: the conv state needs their lengths
        self.lengths = torch.tensor(lengths) if padded else None
        self._newest = (torch.arange(len(lengths)), self.lengths - 1) if padded else (slice(None), -1)
        # one new token per row on the native kernel: EngramLayer.decode_step, no reshapes (the
        # forward that calls the hook runs without autograd, which the kernels need); from the
        # native prefetch worker, wait and decode_step are one call (NativeTicket.mix, with the
        # conv states and weights EngramRuntime.prepare gave it)
        self._decode = max(lengths) == 1 and kernels.available()
        self._native = self._decode and isinstance(ticket, NativeTicket)
        self.slots = None if self._native else torch.tensor(slots)  # the native ticket has them
        self._gates: dict[int, torch.Tensor] = {}
        self._gate_means: dict[int, list[float]] | None = None

    def __call__(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._native:  # hidden [B, 1, D] is decode_step's [B, hc = 1, D]; the ticket keeps the gates
            return self.ticket.mix(layer_id, hidden)
        layer = self.runtime.layers[layer_id]
        conv_state = self.runtime.conv_states[layer_id]
        if self._decode:  # the rows' keys and value, computed by the prefetcher
            out = layer.decode_step(hidden, self.ticket.wait(layer_id), conv_state, self.slots)
            self._gates[layer_id] = layer.last_gate
            return hidden + out
        memory = self.ticket.wait(layer_id)  # the rows' keys and value, computed by the prefetcher
        B, T, _ = hidden.shape
        out = layer.mix(hidden.unsqueeze(2), memory.view(B, T, *memory.shape[1:]),
                        conv_state, self.lengths, self.slots)
        self._gates[layer_id] = layer.last_gate[self._newest]  # [B, hc]: each row's newest token
        return hidden + out.squeeze(2)

    def gates(self, row: int) -> dict[int, float]:
        """Each layer's mean gate over the branches for this row's newest token; the first call
        reduces every layer and row at once: in the native ticket, or with one tolist() per layer
        and Python sums over the few branches (torch ops here cost ~40 us each with the caches the
        forward left)."""
        if self._gate_means is None:
            self._gate_means = self.ticket.gate_means() if self._native else {
                lid: [sum(g) / len(g) for g in gates.tolist()] for lid, gates in self._gates.items()}
        return {lid: g[row] for lid, g in self._gate_means.items()}


class EngramRuntime:
    def __init__(self, layers: dict[int, EngramLayer], hasher: NgramHasher, tables: TableSet,
                 head_offsets: dict[int, np.ndarray], runner: ModelRunner, prefetch: bool = True):
        self.layers, self.hasher, self.tables = layers, hasher, tables
        self.dtype = runner.dtype
        self.prefetcher = Prefetcher(tables, head_offsets, enabled=prefetch, transform=self._memory, hasher=hasher)
        self.conv_states = {lid: layer.new_conv_state(runner.num_slots) for lid, layer in layers.items()}
        self.prepare()
        self.layer_ids = sorted(layers)
        self.table_stats = tables.stats
        self.ngram = hasher.cfg.max_ngram_size
        runner.model.set_engram_layers(self.layer_ids)

    @classmethod
    def load(cls, config, tokenizer, runner: ModelRunner) -> "EngramRuntime":
        """config: EngineConfig (engram dir, placement, cache, prefetch, verification)."""
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
        # Parameters in float32 whatever the backbone's dtype: mix() is a few small ops on the
        # float32 residual stream. The projections, the layer's only matmuls, run prepacked in the
        # backbone's dtype (see EngramLayer.prepare_for_inference).
        return cls(ckpt.build_layers(dtype=torch.float32), hasher, tables, ckpt.head_offsets, runner, config.prefetch)

    @torch.no_grad()  # runs on the prefetch worker, whose thread starts with autograd on
    def _memory(self, layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        """The prefetcher's transform: the layer's token-only half (EngramLayer.memory) of its rows."""
        return self.layers[layer_id].memory(rows)

    def prepare(self) -> None:
        """Pack the layers' weights for inference (EngramLayer.prepare_for_inference) and hand the
        projections to the prefetcher's native worker, as _memory applies them, with what a
        decode step's mix needs (conv state, weights); call again after changing the layers'
        parameters."""
        projections = {}
        for layer_id, layer in self.layers.items():
            layer.prepare_for_inference(self.dtype)
            proj = layer.fused_proj
            projections[layer_id] = Projection(proj.weight, proj.bias, (layer.hc_mult + 1, layer.hidden_size),
                                               mix=(self.conv_states[layer_id], *layer.decode_weights()))
        self.prefetcher.set_projections(projections)

    def step_hook(self, token_ids: list[list[int]], rows: list[Row]) -> EngramStepHook:
        """Submit this forward's tokens now (each row's new tokens after up to N - 1 before them,
        NgramHasher.step_rows); the returned hook is the model's `engram`. token_ids[b]: row b's
        sequence so far (at least up to the row's last token)."""
        before = self.ngram - 1
        contexts = [ids[max(0, r.start_pos - before) : r.start_pos + len(r.token_ids)] for ids, r in zip(token_ids, rows)]
        lengths, slots = [len(r.token_ids) for r in rows], [r.slot for r in rows]
        ticket = self.prefetcher.submit_tokens(contexts, lengths, slots)
        fresh = [r.slot for r in rows if r.start_pos == 0]
        if fresh:
            for states in self.conv_states.values():
                states[fresh] = 0  # a new sequence in a reused slot starts with an empty conv state
        return EngramStepHook(self, ticket, lengths, slots)

    def close(self) -> None:
        self.prefetcher.close()
        self.tables.close()
