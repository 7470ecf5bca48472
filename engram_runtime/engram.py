"""EngramLayer: gate gathered N-gram memory rows with the hidden state and add a short conv.

Parameter names equal those of DeepSeek's reference `Engram` module (minus the
table), so reference state dicts load as they are. The layer never holds the
table: rows arrive already gathered (from offload/), which keeps a multi-GB table
out of the module and lets it live in host memory or on disk. This is plain torch,
the reference for training and for the serving paths' kernels (engram_runner.py
runs it, or the kernels that replace it, a step at a time).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram_kernels import MixWeights

from .engram_config import EngramConfig

# The reference builds the gate's RMSNorms with eps=None (torch's default, finfo(dtype).eps)
# and the short conv's with 1e-5; both are part of the numerics the golden vectors pin down.
_GATE_NORM_EPS = None
_CONV_NORM_EPS = 1e-5
_FLOAT32_EPS = torch.finfo(torch.float32).eps  # what _GATE_NORM_EPS = None means for the float32 kernel


def _gated_conv(hidden: torch.Tensor, memory: torch.Tensor, left: torch.Tensor,
                w: MixWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EngramLayer.mix's tensor math: the gate, then the short conv over the gated value.

    hidden [B, T, hc, D]; memory [B, T, hc + 1, D] (EngramLayer.memory); left [B, context, hc*D],
    the conv inputs of the previous positions; w: EngramLayer.mix_weights(). Returns the output
    [B, T, hc, D], the conv input with its left context [B, context + T, hc*D] (the next state is
    its tail) and the gate [B, T, hc]."""
    b, t, g, d = hidden.shape
    dilation, norm_weight = w.dilation, w.norm_weight
    query = F.rms_norm(hidden, (d,), eps=_GATE_NORM_EPS)  # both gate norms' weights are in key_scale
    keys = F.rms_norm(memory[:, :, :g], (d,), eps=_GATE_NORM_EPS) * w.key_scale
    score = (keys * query).sum(dim=-1)  # [B, T, hc]
    # Signed square root tames large dot products before the sigmoid (reference).
    gate = (score.abs().clamp_min(1e-6).sqrt() * score.sign()).sigmoid()
    value = gate.unsqueeze(-1) * memory[:, :, g:]  # [B, T, hc, D]
    normed = (F.rms_norm(value, (d,), eps=_CONV_NORM_EPS) * norm_weight).flatten(2)  # every branch at once
    full = torch.cat([left.to(normed.dtype), normed], dim=1)
    # Depthwise causal conv as kernel_size shifted multiply-adds in channels-last layout: the same
    # sum as Conv1d, without transposes, and several times faster than mkldnn for decode's T=1.
    taps = w.taps.to(normed.dtype)
    y = full[:, :t] * taps[0]
    for j in range(1, len(taps)):
        y = y.addcmul_(full[:, j * dilation: j * dilation + t], taps[j])
    return value + F.silu(y).view(b, t, g, d), full, gate


class ShortConv(nn.Module):
    """The short conv's parameters (per-branch RMSNorm, depthwise causal dilated Conv1d without
    bias, then SiLU; the math is in _gated_conv) and its state across calls.

    The state ([B, (kernel_size-1)*dilation, hc*D], the previous positions' conv inputs, zeros at
    sequence start) lets the conv continue where the last call stopped, so decoding one token at a
    time reproduces a full-sequence forward.
    """

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int):
        super().__init__()
        self.hc_mult = hc_mult
        self.dilation = dilation
        channels = hidden_size * hc_mult
        self.context = (kernel_size - 1) * dilation
        # padding=0: causality comes from the explicit left context (zeros or state).
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=dilation)
        self.norms = nn.ModuleList(nn.RMSNorm(hidden_size, eps=_CONV_NORM_EPS) for _ in range(hc_mult))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch norms' weights [hc, D] and the conv taps [kernel_size, hc*D], in the layouts
        _gated_conv uses (contiguous, as the decode kernel needs them)."""
        return torch.stack([norm.weight for norm in self.norms]), self.conv.weight[:, 0, :].t().contiguous()

    def left_context(self, batch: int, state: torch.Tensor | None, slots: torch.Tensor | None) -> torch.Tensor:
        """The conv inputs before this call's first position: zeros, `state`, or its rows `slots`."""
        shape = (batch, self.context, self.conv.in_channels)
        if state is None:
            return self.conv.weight.new_zeros(shape)
        left = state if slots is None else state.index_select(0, slots)
        if left.shape != shape:
            raise ValueError(f"conv_state must have shape {shape}, got {tuple(left.shape)}")
        return left

    def update_state(self, state: torch.Tensor, full: torch.Tensor, lengths: torch.Tensor | None,
                     slots: torch.Tensor | None) -> None:
        """Write the newest `context` conv inputs of `full` ([B, context + T, C]) into `state`;
        with lengths [B], each row's newest valid ones (right-padded rows)."""
        if lengths is None:
            newest = full[:, -self.context:]
        else:
            idx = lengths.to(full.device, torch.long)[:, None] + torch.arange(self.context, device=full.device)
            newest = full.gather(1, idx[:, :, None].expand(-1, -1, full.shape[-1]))
        if slots is None:
            state.copy_(newest)
        else:
            state.index_copy_(0, slots, newest.to(state.dtype))


class EngramLayer(nn.Module):
    """One Engram layer's dense part: key/value projections, gate norms, short conv."""

    def __init__(self, cfg: EngramConfig, layer_id: int, hidden_size: int, hc_mult: int = 1):
        super().__init__()
        if layer_id not in cfg.layer_ids:
            raise ValueError(f"EngramLayer: layer_id {layer_id} is not in EngramConfig.layer_ids {cfg.layer_ids}")
        self.cfg = cfg
        self.layer_id = layer_id
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.value_proj = nn.Linear(cfg.engram_dim, hidden_size)
        self.key_projs = nn.ModuleList(nn.Linear(cfg.engram_dim, hidden_size) for _ in range(hc_mult))
        self.norm1 = nn.ModuleList(nn.RMSNorm(hidden_size, eps=_GATE_NORM_EPS) for _ in range(hc_mult))
        self.norm2 = nn.ModuleList(nn.RMSNorm(hidden_size, eps=_GATE_NORM_EPS) for _ in range(hc_mult))
        self.short_conv = ShortConv(hidden_size, cfg.kernel_size, cfg.max_ngram_size, hc_mult)
        self.last_gate: torch.Tensor | None = None

    def new_conv_state(self, batch_size: int, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """Zeros [B, (kernel_size-1)*max_ngram_size, hc*D]: the conv state of fresh sequences."""
        w = self.short_conv.conv.weight
        return torch.zeros(batch_size, self.cfg.conv_state_len, self.hc_mult * self.hidden_size,
                           dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, hidden_states: torch.Tensor, embeddings: torch.Tensor,
                conv_state: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [B, T, hc, D], embeddings [B, T, heads_total, head_dim] (gathered rows)
        -> [B, T, hc, D], the Engram output before the residual add.

        conv_state: see ShortConv (updated in place). lengths [B]: valid tokens per row when the
        batch is right-padded to T (mixed prefill/decode); padded positions' outputs are garbage
        to be dropped, and they never enter conv_state."""
        b, t = hidden_states.shape[:2]
        expected = (b, t, self.cfg.heads_total, self.cfg.head_dim)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"EngramLayer {self.layer_id}: embeddings must be {list(expected)}, "
                             f"got {list(embeddings.shape)}")
        return self.mix(hidden_states, self.memory(embeddings), conv_state, lengths)

    def mix_weights(self) -> MixWeights:
        """The weights mix() applies, in their final forms: both gate norms' weights and 1/sqrt(D)
        folded into one key scale (which leaves the hidden state one plain RMS normalisation and
        one dot product per branch), the conv's norm weights and taps. A serving runner makes them
        once (EngramRunner.prepare), and the decode kernel takes them as they are."""
        scale = torch.stack([n1.weight * n2.weight for n1, n2 in zip(self.norm1, self.norm2)])
        norm_weight, taps = self.short_conv.weights()
        return MixWeights(scale / math.sqrt(self.hidden_size), norm_weight, taps, self.short_conv.dilation,
                          _FLOAT32_EPS, _CONV_NORM_EPS)

    def memory(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The half of the layer that depends on the gathered rows alone, its projections:
        [..., heads_total, head_dim] -> [..., hc + 1, D], per branch the key, then the value.
        Row ids are known before the forward reaches the layer, so serving computes this off the
        critical path. The keys' normalisation is left to mix()."""
        emb = embeddings.flatten(start_dim=-2).to(self.value_proj.weight.dtype)
        return torch.stack([proj(emb) for proj in (*self.key_projs, self.value_proj)], dim=-2)

    def mix(self, hidden_states: torch.Tensor, memory: torch.Tensor, conv_state: torch.Tensor | None = None,
            lengths: torch.Tensor | None = None, slots: torch.Tensor | None = None,
            weights: MixWeights | None = None) -> torch.Tensor:
        """The half that needs the hidden state: gate the memory's value by how well its keys
        match the hidden state, then the short conv. memory: memory()'s [B, T, hc + 1, D]; the
        other arguments as forward(), and slots [B]: conv_state is then the engine's per-slot
        store [slots, context, hc*D], of which this batch's rows are `slots`. weights: this
        layer's mix_weights(), when the caller keeps them."""
        b, t, g, d = hidden_states.shape
        if g != self.hc_mult or d != self.hidden_size:
            raise ValueError(f"EngramLayer {self.layer_id}: hidden_states must be [B, T, {self.hc_mult}, "
                             f"{self.hidden_size}], got {tuple(hidden_states.shape)}")
        conv = self.short_conv
        left = conv.left_context(b, conv_state, slots)
        out, full, gate = _gated_conv(hidden_states, memory, left, weights or self.mix_weights())
        if conv_state is not None:
            conv.update_state(conv_state, full, lengths, slots)
        self.last_gate = gate.detach()
        return out

    def load_reference_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a reference `Engram` state dict; its table ('multi_head_embedding.*') is skipped."""
        dense = {k: v for k, v in sd.items() if not k.startswith("multi_head_embedding.")}
        own = self.state_dict()
        missing = sorted(set(own) - set(dense))
        unexpected = sorted(set(dense) - set(own))
        if missing or unexpected:
            raise ValueError(f"EngramLayer {self.layer_id}: state dict mismatch; missing {missing}, "
                             f"unexpected {unexpected}")
        for k, v in dense.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"EngramLayer {self.layer_id}: '{k}' has shape {list(v.shape)}, "
                                 f"expected {list(own[k].shape)}")
        self.load_state_dict(dense)
