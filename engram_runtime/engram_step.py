"""One forward's Engram work as the backbone sees it: EngramStep, the hook of its Engram layers.

A backend (engram_runner.py chooses one per step) is handed the step's tokens and returns a
ticket at once: each layer's memory (the gathered rows, projected: ``memory(layer_id)``) is on
its way while the layers before it compute. At an Engram layer the backbone calls the step
with its residual stream; the step takes that layer's memory and mixes it with the hidden
state (gate, short conv over the per-slot conv state, residual add). A ticket that can do a
whole decode mix in one call (the native worker's) is asked to.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

import engram_kernels as kernels
from engram_kernels import MixWeights
from engram_runtime.engram import EngramLayer
from engram_runtime.model import PackedLinear


class PrefetchError(RuntimeError):
    """Fetching one layer's rows failed; the message names the layer and the original error."""


def fetch_failed(layer_id: int, exc: BaseException) -> PrefetchError:
    """The PrefetchError for an error of a layer's fetch (the caller chains the original)."""
    if isinstance(exc, PrefetchError):
        return exc
    return PrefetchError(f"gathering rows for layer {layer_id} failed: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class StepTokens:
    """One forward's tokens as the Engram side needs them, per chunk (a sequence's part of the
    step): its new tokens after up to N - 1 tokens before them (NgramHasher.step_rows), how
    many are new, and its KV slot (which is also its conv state's row); `fresh`: the slots whose
    sequences start in this step."""

    contexts: list[list[int]]
    new_tokens: list[int]
    slots: list[int]
    fresh: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        """Tokens in the step's padded batch [chunks, longest chunk]."""
        return len(self.contexts) * max(self.new_tokens)


class Ticket(Protocol):
    """A backend's step in flight."""

    def memory(self, layer_id: int) -> torch.Tensor:
        """The layer's memory [tokens, hc + 1, D], float32 on the compute device; waits if needed."""
        ...


@dataclass(frozen=True)
class ServingWeights:
    """An Engram layer's weights as serving applies them: the key and value projections fused
    into one matmul in the backbone's dtype (one matmul instead of hc + 1), and mix_weights()."""

    projection: PackedLinear
    mix: MixWeights
    shape: tuple[int, int]  # (hc + 1, D): one projected row of memory

    @classmethod
    def of(cls, layer: EngramLayer, dtype: torch.dtype, pack: bool = True) -> "ServingWeights":
        """pack: prepack the projection for oneDNN where it can (not on the GPU's code path)."""
        projs = [*layer.key_projs, layer.value_proj]
        projection = PackedLinear(torch.cat([p.weight for p in projs]).detach().to(dtype), pack,
                                  bias=torch.cat([p.bias for p in projs]).detach())
        mix = MixWeights(**{k: v.detach() if isinstance(v, torch.Tensor) else v
                            for k, v in vars(layer.mix_weights()).items()})
        return cls(projection, mix, (layer.hc_mult + 1, layer.hidden_size))

    @torch.no_grad()  # serving only; also on the Python prefetch worker, a new thread
    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [tokens, heads, head_dim] -> memory [tokens, hc + 1, D], float32. A decode step's
        few rows go to small_linear, as on the native worker, so both paths give the same bits."""
        emb = rows.flatten(start_dim=-2)
        proj = self.projection
        if len(emb) <= kernels.SMALL_LINEAR_MAX_ROWS and kernels.enabled(emb):
            return kernels.small_linear(emb, proj.weight, proj.bias).unflatten(-1, self.shape)
        return proj(emb).float().unflatten(-1, self.shape)


class EngramStep:
    """The backbone's Engram hook for one forward: ``step(layer_id, hidden [B, T, D])`` -> hidden
    with the layer's output added. ``gates(rows)`` then tells each layer's mean gate for those
    rows' newest tokens, and ``finish()``, after the step's transfer to the host, records what the
    ticket measured on the device.

    slots [B] and lengths [B] (right-padded rows) are the ticket's device tensors; a ticket that
    mixes a whole decode step in one native call (``fused``) has its own."""

    def __init__(self, layers: dict[int, EngramLayer], weights: dict[int, ServingWeights],
                 conv_states: dict[int, torch.Tensor], ticket: Ticket, slots: torch.Tensor | None,
                 lengths: torch.Tensor | None, fused: bool = False):
        self.layers, self.weights, self.conv_states, self.ticket = layers, weights, conv_states, ticket
        self.layer_ids = frozenset(layers)
        self.slots, self.lengths, self._fused = slots, lengths, fused
        self._gates: dict[int, torch.Tensor] = {}

    def __call__(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._fused:
            return self.ticket.mix(layer_id, hidden)
        memory = self.ticket.memory(layer_id)
        state, weights = self.conv_states[layer_id], self.weights[layer_id].mix
        b, t, d = hidden.shape
        if t == 1 and kernels.enabled(hidden):  # a decode step: hidden [B, 1, D] is [B, hc = 1, D]
            out, self._gates[layer_id] = kernels.engram_mix(hidden, memory, state, self.slots, weights)
            return hidden + out
        layer = self.layers[layer_id]
        out = layer.mix(hidden.unsqueeze(2), memory.view(b, t, *memory.shape[1:]), state, self.lengths,
                        self.slots, weights)
        gate = layer.last_gate  # [B, T, hc]: keep each row's newest token's
        if self.lengths is None:
            self._gates[layer_id] = gate.select(1, t - 1)
        else:
            newest = (self.lengths - 1).view(b, 1, 1).expand(b, 1, gate.shape[-1])
            self._gates[layer_id] = gate.gather(1, newest).squeeze(1)
        return hidden + out.squeeze(2)

    def gates(self, rows: list[int]) -> list[list[float]] | torch.Tensor:
        """Each layer's gate (ascending layer id), averaged over the branches, for the newest token
        of each of `rows`: host lists on the CPU (the native ticket reduces its own in one call, the
        torch path takes one tolist() per layer: cheaper than torch ops on cold caches); on a GPU a
        tensor [len(rows), layers] there, to ride the step's one transfer (sampling.sample)."""
        if self._fused:
            means = self.ticket.gate_means()
            return [[means[lid][r] for lid in sorted(means)] for r in rows]
        layers = [self._gates[lid] for lid in sorted(self._gates)]
        if layers[0].device.type == "cpu":
            means = [[sum(g) / len(g) for g in gate.tolist()] for gate in layers]
            return [[layer[r] for layer in means] for r in rows]
        index = torch.tensor(rows, device=layers[0].device)
        return torch.stack([gate.mean(dim=-1) for gate in layers], dim=1).index_select(0, index)

    def finish(self) -> None:
        finish = getattr(self.ticket, "finish", None)
        if finish is not None:
            finish()
