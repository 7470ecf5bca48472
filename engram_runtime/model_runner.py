"""ModelRunner: owns the backbone and its KV cache on the compute device; turns a step's chunks
into logits.

A chunk is one sequence's part of a step: (cache slot, new token ids, position of the first of
them). On the CPU a step of one new token per chunk goes to the fused decode kernel
(DecodeInputs: slots, positions, rope rows). Every other step pads the chunks to one [B, T] batch
with positions, rope rows and the causal mask over the static cache (AttentionInputs), built on
the device from a few index tensors the host makes from the chunks, and reads the cache the
cheapest way for this batch: a slice when the batch's slots form a (nearly) contiguous range (a
view, no copy), else the slots gathered. A decode step on a GPU takes decode_inputs(), device
ops alone (a CUDA graph captures them), and reads each slot in place with the cache attention
kernel (engram_kernels.triton_attention). The cache has one slot more than the engine hands out:
padded rows of a captured decode graph (cuda_graphs.py) write there.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

import engram_kernels as kernels
from engram_kernels import triton_attention
from engram_runtime.config import ModelConfig
from engram_runtime.model import AttentionInputs, DecodeInputs, EngramHook, Transformer, rope_tables
from engram_runtime.quantization import BlockWeight
from offload.device import ComputeDevice

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX). Elsewhere torch's bf16
    matmuls are plain loops, several times slower than float32 (docs/performance.md), so a CPU
    caller picking a compute dtype for speed picks float32 there."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@dataclass
class Chunk:
    """One sequence's part of a step: its KV slot, its new tokens and the first one's position."""

    slot: int
    token_ids: list[int]
    start_pos: int


class ModelRunner:
    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, num_slots: int,
                 max_model_len: int, pack_weights: bool = True, device: ComputeDevice | str = "cpu",
                 blocks: dict[str, BlockWeight] | None = None):
        """blocks: quantised weights by matmul name (quantization.linear_blocks) that CPU decode
        steps read instead of the dense ones; the portable path computes with the dense ones."""
        self.config = config
        self.dtype = dtype
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.device = device if isinstance(device, ComputeDevice) else ComputeDevice(device)
        dev = self.device.torch_device
        with torch.device("meta"):  # no random init of 100M+ parameters we overwrite anyway
            model = Transformer(config)
        model.load_hf_state_dict({name: t.to(device=dev, dtype=dtype) for name, t in state_dict.items()})
        self.model = model.eval().requires_grad_(False)
        portable = self.device.portable  # the GPU's code: torch ops only, on whatever device
        self.model.prepare_for_inference(pack=pack_weights and not portable, blocks=None if portable else blocks)
        self._ops = kernels.disabled if portable else contextlib.nullcontext
        # one scratch position past the end: padded tokens write their K/V there
        self.scratch_pos = max_model_len
        self.fused_decode = not portable and kernels.available()
        # a bfloat16 model keeps a bfloat16 cache where its decode kernels read it (half the bytes
        # a decode step waits on); the CPU's torch decode path wants float32
        self.cache_dtype = dtype if self.fused_decode or dev.type != "cpu" else torch.float32
        self.set_num_slots(num_slots)
        self.cos, self.sin = (t.to(dev) for t in rope_tables(config, max_model_len + 1))
        self.cache_attention = dev.type != "cpu" and triton_attention.available(dev)

    def set_num_slots(self, num_slots: int) -> None:
        """A new, empty KV cache of num_slots slots (and the pad slot)."""
        self.num_slots, self.pad_slot = num_slots, num_slots
        self.model.setup_cache(num_slots + 1, self.max_model_len + 1, self.cache_dtype, self.device.torch_device)

    @property
    def cache_slots(self) -> int:
        """Slots of every per-slot state (KV cache, Engram conv states): the pad slot included."""
        return self.num_slots + 1

    def _index(self, values) -> torch.Tensor:
        """An int64 index tensor on the compute device from host values."""
        return torch.tensor(values, dtype=torch.long, device=self.device.torch_device)

    def decode_inputs(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> AttentionInputs:
        """A decode step's attention inputs from its slots and positions [B], device tensors only
        (so a CUDA graph can capture it): kv_len bounds the positions read on the torch path."""
        kv = self.config.num_key_value_heads
        heads = torch.arange(kv, device=slots.device)
        write_rows = ((slots[:, None] * kv + heads) * self.model.cache_len + positions[:, None]).reshape(-1)
        allowed = torch.arange(kv_len, device=slots.device)[None, :] <= positions[:, None]
        mask = torch.zeros(allowed.shape, device=slots.device).masked_fill_(~allowed, float("-inf"))
        cos, sin = (t.index_select(0, positions)[:, None, None] for t in (self.cos, self.sin))
        fast = self.cache_attention
        return AttentionInputs(write_rows, slots, None, kv_len, mask[:, None, None], cos, sin,
                               slots if fast else None, positions if fast else None)

    def attention_inputs(self, chunks: list[Chunk], pack: bool = False
                         ) -> tuple[torch.Tensor, AttentionInputs | DecodeInputs, torch.Tensor]:
        """The forward's inputs for `chunks`: token ids [B, T], attention plumbing, and the rows of
        the logits to keep (each chunk's last token). pack: where the chunks differ in length, run
        the token-wise work on their real tokens only (AttentionInputs.packed), the logits rows then
        counted among those."""
        B = len(chunks)
        lens = [len(c.token_ids) for c in chunks]
        starts = [c.start_pos for c in chunks]
        slot_ids = [c.slot for c in chunks]
        decode = max(lens) == 1
        if decode and (self.device.portable or self.fused_decode and kernels.enabled()):
            positions, slots = self._index(starts), self._index(slot_ids)
            input_ids, rows = self._index([c.token_ids for c in chunks]), torch.arange(B, device=slots.device)
            if self.device.portable:
                return input_ids, self.decode_inputs(slots, positions, max(starts) + 1), rows
            return input_ids, DecodeInputs(slots, positions, self.cos[positions], self.sin[positions]), rows
        T = max(lens)
        input_ids = self._index([c.token_ids + [0] * (T - len(c.token_ids)) for c in chunks])
        lens_t, starts_t, slots = self._index(lens), self._index(starts), self._index(slot_ids)
        t = torch.arange(T, device=slots.device)
        positions = starts_t[:, None] + t[None, :]
        valid = t[None, :] < lens_t[:, None]
        write_pos = torch.where(valid, positions, self.scratch_pos)
        kv_len = max(s + n for s, n in zip(starts, lens))
        lo, hi = min(slot_ids), max(slot_ids) + 1
        q_rows = None
        if hi - lo == B and slot_ids == list(range(lo, hi)):
            read, mask_pos = (lo, hi), positions
        elif hi - lo <= 2 * B:  # attend over the slot range; idle rows are computed and dropped
            read, q_rows = (lo, hi), slots - lo
            mask_pos = torch.zeros(hi - lo, T, dtype=torch.long, device=slots.device).index_copy_(0, q_rows, positions)
        else:
            read, mask_pos = slots, positions
        allowed = torch.arange(kv_len, device=slots.device)[None, None, :] <= mask_pos[:, :, None]
        mask = torch.zeros(allowed.shape, device=slots.device).masked_fill_(~allowed, float("-inf")).unsqueeze(1)
        kv = self.config.num_key_value_heads
        head_rows = (slots[:, None, None] * kv + torch.arange(kv, device=slots.device)) * self.model.cache_len
        attn = AttentionInputs(
            write_rows=(head_rows + write_pos[:, :, None]).reshape(-1),
            read=read,
            q_rows=q_rows,
            kv_len=kv_len,
            mask=mask,
            cos=self.cos[write_pos].unsqueeze(2),
            sin=self.sin[write_pos].unsqueeze(2),
        )
        if pack and sum(lens) < B * T:  # built on the host from the lengths: a mask's nonzero() would sync
            attn.packed = self._index([b * T + i for b, n in enumerate(lens) for i in range(n)])
            return input_ids, attn, self._index(list(itertools.accumulate(lens))) - 1
        logits_index = torch.arange(B, device=slots.device) * T + lens_t - 1
        return input_ids, attn, logits_index

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], engram: EngramHook | None = None, all_logits: bool = False) -> torch.Tensor:
        """Logits [B, vocab] at each chunk's last token (or [B, T, vocab] with all_logits), in
        the weights' dtype: the sampler converts only the rows that need float32."""
        with self._ops():
            input_ids, attn, logits_index = self.attention_inputs(chunks, pack=not all_logits)
            if all_logits:
                return self.model(input_ids, attn, None, engram).view(*input_ids.shape, -1)
            return self.model(input_ids, attn, logits_index, engram)

    def ops(self):
        """The context a forward of this runner runs in (torch ops only on a portable device)."""
        return self._ops()
