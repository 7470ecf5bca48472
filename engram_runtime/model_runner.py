"""ModelRunner: owns the backbone and its KV cache; turns a step's chunks into logits.

A chunk is one sequence's part of a step: (cache slot, new token ids, position of the first
of them). A step of one new token per chunk goes to the fused decode kernel (DecodeInputs:
slots, positions, rope rows). Otherwise the runner pads chunks to one [B, T] batch, builds positions,
rope tables and the causal mask over the static cache, and picks the cheapest way
to read the cache for this batch: a slice when the batch's slots form a (nearly)
contiguous range, so attention reads K/V in place instead of copying them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import engram_kernels as kernels
from engram_runtime.config import ModelConfig
from engram_runtime.model import AttentionInputs, DecodeInputs, EngramHook, Transformer, rope_tables

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


@dataclass
class Chunk:
    """One sequence's part of a step: its KV slot, its new tokens and the first one's position."""

    slot: int
    token_ids: list[int]
    start_pos: int


class ModelRunner:
    def __init__(
        self,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype,
        num_slots: int,
        max_model_len: int,
        pack_weights: bool = True,
    ):
        self.config = config
        self.dtype = dtype
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        with torch.device("meta"):  # no random init of 100M+ parameters we overwrite anyway
            model = Transformer(config)
        model.load_hf_state_dict(state_dict)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.model.prepare_for_inference(pack=pack_weights)
        # one scratch position past the end: padded tokens write their K/V there
        self.scratch_pos = max_model_len
        # bfloat16 models keep a bfloat16 KV cache when the fused decode kernel can read it
        # (half the bytes a decode step waits on); torch's decode path wants float32
        cache_dtype = torch.bfloat16 if dtype == torch.bfloat16 and kernels.available() else torch.float32
        self.model.setup_cache(num_slots, max_model_len + 1, cache_dtype)
        self.cos, self.sin = rope_tables(config, max_model_len + 1)

    def attention_inputs(
        self, chunks: list[Chunk]
    ) -> tuple[torch.Tensor, AttentionInputs | DecodeInputs, torch.Tensor]:
        B = len(chunks)
        if all(len(c.token_ids) == 1 for c in chunks) and kernels.enabled():  # fused decode attention
            positions = torch.tensor([c.start_pos for c in chunks])
            slots = torch.tensor([c.slot for c in chunks])
            decode = DecodeInputs(slots, positions, self.cos[positions], self.sin[positions])
            return torch.tensor([c.token_ids for c in chunks]), decode, torch.arange(B)
        lens = torch.tensor([len(c.token_ids) for c in chunks])
        T = int(lens.max())
        starts = torch.tensor([c.start_pos for c in chunks])
        slots = torch.tensor([c.slot for c in chunks])
        input_ids = torch.tensor([c.token_ids + [0] * (T - len(c.token_ids)) for c in chunks])
        t = torch.arange(T)
        positions = starts[:, None] + t[None, :]
        valid = t[None, :] < lens[:, None]
        write_pos = torch.where(valid, positions, self.scratch_pos)
        kv_len = int((starts + lens).max())
        lo, hi = int(slots.min()), int(slots.max()) + 1
        q_rows = None
        if hi - lo == B and bool((slots == torch.arange(lo, hi)).all()):
            read, mask_pos = (lo, hi), positions
        elif hi - lo <= 2 * B:  # attend over the slot range; idle rows are computed and dropped
            read, q_rows = (lo, hi), slots - lo
            mask_pos = torch.zeros(hi - lo, T, dtype=torch.long)
            mask_pos[q_rows] = positions
        else:
            read, mask_pos = slots, positions
        allowed = torch.arange(kv_len)[None, None, :] <= mask_pos[:, :, None]
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).unsqueeze(1)
        rope_pos = write_pos
        kv = self.config.num_key_value_heads
        head_rows = (slots[:, None, None] * kv + torch.arange(kv)) * self.model.cache_len  # [B, 1, kv]
        attn = AttentionInputs(
            write_rows=(head_rows + write_pos[:, :, None]).reshape(-1),
            read=read,
            q_rows=q_rows,
            kv_len=kv_len,
            mask=mask,
            cos=self.cos[rope_pos].unsqueeze(2),
            sin=self.sin[rope_pos].unsqueeze(2),
        )
        logits_index = torch.arange(B) * T + lens - 1
        return input_ids, attn, logits_index

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk], engram: EngramHook | None = None, all_logits: bool = False) -> torch.Tensor:
        """Logits [B, vocab] at each chunk's last token (or [B, T, vocab] with all_logits), in
        the weights' dtype: the sampler converts only the rows that need float32."""
        input_ids, attn, logits_index = self.attention_inputs(chunks)
        if all_logits:
            return self.model(input_ids, attn, None, engram).view(*input_ids.shape, -1)
        return self.model(input_ids, attn, logits_index, engram)
