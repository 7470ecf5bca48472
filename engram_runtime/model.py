"""The Llama-family backbone, gpt-fast style: plain modules, one forward.

The forward works on a padded batch [B, T] where row b holds tokens at absolute
positions `positions[b]` of the sequence living in KV-cache slot `slots[b]`. The
same code runs prefill (T = prompt chunk), decode (T = 1) and mixed lengths; the
caller (model_runner) builds positions, the attention mask and the cache view, or,
for a decode step on the fused kernels (engram_kernels), just slots and positions.
Where rows differ in length, the batch can be packed (AttentionInputs.packed): the
token-wise work (matmuls, norms, MLP) then runs on the real tokens only, and only
attention and the Engram hook, which need each row's positions, see them in [B, T].

Q/K/V and gate/up are fused into single matmuls (fewer, larger GEMMs: on a
2-core CPU the per-op overhead is a visible share of a decode step).
"""
from __future__ import annotations

import functools
import math
import mmap
from dataclasses import dataclass
from typing import Collection, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import engram_kernels as kernels
from engram_kernels.triton_attention import cache_attention
from engram_runtime.config import ModelConfig
from engram_runtime.quantization import BlockWeight

# Rows up to which a QuantizedLinear reads its blocks rather than its dense copy, by the dense
# copy's dtype: where the block kernel's per-row arithmetic overtakes the bytes it saves
# (docs/performance.md, "Quantized weights")
QUANTIZED_MAX_ROWS = {torch.bfloat16: 3, torch.float32: 6}
# The same for a bfloat16 copy where steps of 2 rows or more read the blocks with bfloat16 dot
# products (AVX-512 BF16)
BF16_DOT_MAX_ROWS = 8


class EngramHook(Protocol):
    """A forward's Engram memory as the decoder blocks see it: at each of its layers a block asks
    for the residual stream `hidden` with the layer's output added (the hook adds it: the native
    path does it inside its one call)."""

    layer_ids: frozenset[int]

    def __call__(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AttentionInputs:
    """Per-step attention plumbing shared by all layers.

    write_rows [B*T*n_kv]: where each token's K/V head goes in the cache seen as rows of
    head_dim, (slot * n_kv + head) * cache_len + position, in (b, t, head) order: one
    index_copy_ per cache per layer, cheaper than a scatter indexed by slot and position
    (docs/performance.md).
    read: how to view the cache for this batch: (slot_start, slot_stop) for a
    contiguous slot range (a view, no copy), else a LongTensor of slots (gather).
    q_rows: when reading a slot range wider than the batch, the rows of that range
    that belong to the batch (None if the range is exactly the batch).
    mask [R, 1, T, kv_len] additive (0 = attend, -inf = masked), float32:
    built once per step instead of converting a bool mask in every layer.
    slots, positions [B]: set for a decode step (T = 1) on a device with the cache attention
    kernel (engram_kernels.triton_attention), which reads each row's slot in place instead.
    packed [N]: the rows of the flattened [B*T] batch that hold real tokens, when the residual
    stream holds only those (a prefill of prompts of different lengths, or prompts beside
    decoding rows: padding is then most of [B, T]); None when it is the whole padded batch.
    """

    write_rows: torch.Tensor
    read: tuple[int, int] | torch.Tensor
    q_rows: torch.Tensor | None
    kv_len: int
    mask: torch.Tensor
    cos: torch.Tensor  # [B, T, 1, head_dim], float32
    sin: torch.Tensor  # signed, see rope_tables
    slots: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    packed: torch.Tensor | None = None

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """Packed rows [N, C] -> [B, T, C], zeros where a row has no token (x itself if unpacked)."""
        if self.packed is None:
            return x
        b, t = self.cos.shape[:2]
        return x.new_zeros(b * t, x.shape[-1]).index_copy_(0, self.packed, x).view(b, t, -1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> its real tokens' rows [N, C] (x itself if unpacked)."""
        return x if self.packed is None else x.reshape(-1, x.shape[-1]).index_select(0, self.packed)


@dataclass
class DecodeInputs:
    """A step where every row is one new token, for the fused decode kernel
    (engram_kernels), which writes K/V and masks by position itself.
    slots, positions [B] int64; cos, sin [B, head_dim] float32 (rows of rope_tables)."""

    slots: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised x in `dtype`, the dtype of the matmul it feeds."""
        return kernels.rms_norm(x, self.weight, self.eps, dtype)


def rope_tables(config: ModelConfig, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [max_len, head_dim], float32, for the HF (rotate-half) layout:
    rotate_half(x) * sin == roll(x, half) * signed_sin, which saves a cat and a neg per call."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query per row: q [R, 1, H, D], keys and values [R, KV, L, D] (views of the
    cache), mask [R, 1, 1, L] -> [R, 1, H, D].

    The query heads sharing a KV head become the rows of one small matmul (no
    repeat of K/V). On the CPU this beats torch's flash SDPA kernel for a decode batch
    (docs/performance.md).
    """
    R, _, H, D = q.shape
    kv = keys.shape[1]
    qg = q.view(R, kv, H // kv, D) * D**-0.5
    scores = torch.matmul(qg, keys.transpose(-1, -2)) + mask
    return torch.matmul(scores.softmax(dim=-1), values).view(R, 1, H, D)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.wqkv = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=False)
        self.wo = nn.Linear(config.q_size, config.hidden_size, bias=False)
        # both [slots, n_kv, max_len, head_dim]: a batch's first L positions are one
        # contiguous block per (slot, head), whatever max_len is. (K stored transposed,
        # [.., head_dim, max_len], strides each of its D rows max_len apart, which slows
        # decode attention down: docs/performance.md.)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, a: AttentionInputs | DecodeInputs) -> torch.Tensor:
        qkv = self.wqkv(x)
        if isinstance(a, DecodeInputs):  # in the cache's dtype, the weights' when the kernel is built
            B, T, _ = x.shape
            qkv = qkv.to(self.k_cache.dtype).view(B, -1, self.head_dim)
            out = kernels.decode_attention(qkv, a.cos, a.sin, self.k_cache, self.v_cache, a.slots, a.positions)
            return self.wo(out.view(B, T, -1))
        qkv = a.padded(qkv)
        B, T, _ = qkv.shape
        # RoPE in float32; attention in float32 on the CPU, whose bfloat16 batched matmuls copy
        # strided K/V slices first and are slower than float32, in the cache's dtype elsewhere
        d, cache_dtype = self.head_dim, self.k_cache.dtype
        attn_dtype = torch.float32 if x.device.type == "cpu" else cache_dtype
        qkv = qkv.float().view(B, T, self.n_heads + 2 * self.n_kv, d)
        qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], a.cos, a.sin)  # q and k heads in one go
        q, k = qk.split([self.n_heads, self.n_kv], dim=2)
        v = qkv[:, :, self.n_heads + self.n_kv :]
        # write this step's K/V into the static cache, then attend over the cache
        self.k_cache.view(-1, d).index_copy_(0, a.write_rows, k.reshape(-1, d).to(cache_dtype))
        self.v_cache.view(-1, d).index_copy_(0, a.write_rows, v.reshape(-1, d).to(cache_dtype))
        if a.slots is not None:  # a decode step read in place by the cache attention kernel
            out = cache_attention(q.reshape(B, self.n_heads, d).to(cache_dtype), self.k_cache, self.v_cache,
                                  a.slots, a.positions)
            return self.wo(out.view(B, T, -1))
        q = q.to(attn_dtype)
        rows = slice(*a.read) if isinstance(a.read, tuple) else a.read
        keys = self.k_cache[rows, :, : a.kv_len].to(attn_dtype)  # no copy for a cache slice in its dtype
        values = self.v_cache[rows, :, : a.kv_len].to(attn_dtype)
        if a.q_rows is not None:  # attend over a slot range: place the batch's queries in it
            full = q.new_zeros(values.shape[0], *q.shape[1:])
            full[a.q_rows] = q
            q = full
        mask = a.mask.to(attn_dtype)
        if T == 1:
            out = decode_attention(q, keys, values, mask)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                 enable_gqa=True).transpose(1, 2)
        if a.q_rows is not None:
            out = out[a.q_rows]
        return self.wo(a.pack(out.reshape(B, T, -1)))


class PackedLinear(nn.Module):
    """Inference linear: casts its input to the weight's dtype (the residual stream is float32,
    weights may be bfloat16); the output is in the weight's dtype. On CPU, where oneDNN can
    pack the weight's dtype, it computes with the weight reordered once into oneDNN's blocked
    layout: F.linear on CPU re-lays-out a bfloat16 weight on every call, and the prepacked
    kernel is faster at every decode batch size with the same results. Elsewhere (CUDA: cuBLAS)
    it is F.linear. Weight and bias are buffers, so an unpacked one moves with .to(device).
    """

    def __init__(self, weight: torch.Tensor, pack: bool = True, bias: torch.Tensor | None = None):
        super().__init__()
        self.dtype = weight.dtype
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach().to(self.dtype))
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight) if pack and can_pack(weight) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class QuantizedLinear(nn.Module):
    """A PackedLinear whose weight is also held in llama.cpp's blocks (quantization.BlockWeight).
    A step of up to max_rows rows (decode) is a read of the weight: it reads the blocks with the
    native kernel, 4.5-8.5 bits per value instead of the dense copy's 16 or 32. Larger steps
    (prefill, large decode batches) are compute-bound, and oneDNN's packed matmul of the dense
    copy, made from the same dequantised values, is several times faster there than any kernel
    that decodes blocks (docs/performance.md). Elsewhere (no native kernels, the portable path)
    it is the dense copy. A bfloat16 copy on a CPU with AVX-512 BF16 reads the blocks of a step
    of 2 rows or more with bfloat16 dot products (block_linear_bf16): the dense copy's arithmetic
    at a third of the float32 kernel's cost per row, so the blocks pay up to more rows. One row
    stays with the float32 kernel, which decodes a block in fewer instructions."""

    def __init__(self, dense: PackedLinear, blocks: BlockWeight):
        super().__init__()
        if dense.bias is not None or blocks.shape != tuple(dense.weight.shape):
            raise ValueError(f"blocks of shape {blocks.shape} for a linear of {tuple(dense.weight.shape)} with bias")
        self.dense, self.blocks, self.dtype = dense, blocks, dense.dtype
        self.bf16_dot = self.dtype == torch.bfloat16 and kernels.block_linear_bf16_fast()
        self.max_rows = BF16_DOT_MAX_ROWS if self.bf16_dot else QUANTIZED_MAX_ROWS.get(self.dtype, 0)

    @property
    def weight(self) -> torch.Tensor:
        return self.dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[-1]
        rows = x.numel() // k
        if rows > self.max_rows or not kernels.enabled(x):
            return self.dense(x)
        b = self.blocks
        matmul = kernels.block_linear_bf16 if self.bf16_dot and rows > 1 else kernels.block_linear
        out = matmul(x.reshape(rows, k), b.qs, b.scales, b.mins, b.bits)
        return out.to(self.dtype).view(*x.shape[:-1], out.shape[-1])


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN can prepack this weight: a CPU tensor of a dtype this CPU's oneDNN packs
    (bfloat16 needs AVX-512 or AVX-NE-CONVERT)."""
    return weight.device.type == "cpu" and _packs(weight.dtype)


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
    except RuntimeError:
        return False
    return True


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.silu_and_mul(self.w13(x), self.w2.dtype))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, a: AttentionInputs | DecodeInputs, engram: EngramHook | None) -> torch.Tensor:
        if engram is not None and self.layer_id in engram.layer_ids:  # joins the residual before attention
            if isinstance(a, AttentionInputs):  # in [B, T], where the hook finds each row's positions
                x = a.pack(engram(self.layer_id, a.padded(x)))
            else:
                x = engram(self.layer_id, x)
        h = self.attention_norm(x, self.attention.wqkv.dtype)
        x, h = kernels.add_rms_norm(x, self.attention(h, a), self.ffn_norm.weight, self.ffn_norm.eps,
                                    self.feed_forward.w13.dtype)
        return x + self.feed_forward(h)


def zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros whose pages the OS commits on first write: an anonymous mapping in 4 KiB pages.
    Not numpy's calloc, which asks for transparent huge pages on large arrays: a sequence's
    first K/V write then committed and zeroed 2 MiB per cache, 3 GB for 32 new sequences, each
    fault waiting on memory compaction, and the first batch that large stalled for seconds
    (docs/performance.md, "Warm-up")."""
    buf = mmap.mmap(-1, math.prod(shape) * dtype.itemsize)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux: also where huge pages are on for every mapping
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.cache_len = 0  # positions per slot of the KV cache, set by setup_cache
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def prepare_for_inference(self, pack: bool = True, blocks: dict[str, BlockWeight] | None = None) -> None:
        """After the weights' dtype is set: every matmul becomes a PackedLinear (a QuantizedLinear
        where `blocks`, by module name, holds its weight in blocks) and the norms go back to
        float32, so the residual stream stays float32 (cheaper norms and adds than in bfloat16
        on the CPU, and more accurate)."""
        blocks = blocks or {}

        def linear(name: str, weight: torch.Tensor) -> nn.Module:
            dense = PackedLinear(weight, pack)
            if name not in blocks:
                return dense
            return QuantizedLinear(dense, blocks[name])

        for i, block in enumerate(self.layers):
            att, ff = block.attention, block.feed_forward
            att.wqkv = linear(f"layers.{i}.attention.wqkv", att.wqkv.weight)
            att.wo = linear(f"layers.{i}.attention.wo", att.wo.weight)
            ff.w13 = linear(f"layers.{i}.feed_forward.w13", ff.w13.weight)
            ff.w2 = linear(f"layers.{i}.feed_forward.w2", ff.w2.weight)
        self.output = linear("output", self.output.weight)
        for norm in [self.norm] + [n for b in self.layers for n in (b.attention_norm, b.ffn_norm)]:
            norm.weight.data = norm.weight.data.float()

    def setup_cache(self, num_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> None:
        """Static per-slot KV cache, float32 or bfloat16 (see Attention). On the CPU allocated with
        calloc-backed zeros: the OS commits a page only when a sequence first writes it, so memory
        follows the tokens actually held, not num_slots * max_len (torch.zeros would touch all of
        it). Zeros rather than garbage keep masked scores finite."""
        shape = (num_slots, self.config.num_key_value_heads, max_len, self.config.head_dim)
        self.cache_len = max_len
        for block in self.layers:
            block.attention.k_cache, block.attention.v_cache = (
                zeros_on_demand(shape, dtype) if torch.device(device).type == "cpu"
                else torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")

    def forward(
        self,
        input_ids: torch.Tensor,
        a: AttentionInputs | DecodeInputs,
        logits_index: torch.Tensor | None = None,
        engram: EngramHook | None = None,
    ) -> torch.Tensor:
        """Returns logits [N, vocab] (weights' dtype) for the flat positions `logits_index`
        of the [B*T] batch, or of its real tokens when `a` is packed (all positions if None)."""
        if isinstance(a, AttentionInputs) and a.packed is not None:
            input_ids = input_ids.reshape(-1).index_select(0, a.packed)
        x = self.tok_embeddings(input_ids).float()
        for block in self.layers:
            x = block(x, a, engram)
        x = x.reshape(-1, x.shape[-1])
        if logits_index is not None:
            x = x.index_select(0, logits_index)
        return self.output(self.norm(x, self.output.dtype))

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Map HF Llama names onto this module, fusing q/k/v and gate/up. Tensors are
        assigned, not copied, so the module can be built on the meta device."""
        mine: dict[str, torch.Tensor] = {
            "tok_embeddings.weight": sd["model.embed_tokens.weight"],
            "norm.weight": sd["model.norm.weight"],
        }
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            mine[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
            mine[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        for name, sources in linear_sources(self.config, sd).items():
            mine[f"{name}.weight"] = sd[sources[0]] if len(sources) == 1 else torch.cat([sd[n] for n in sources])
        self.load_state_dict(mine, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight


def linear_sources(config: ModelConfig, names: Collection[str]) -> dict[str, list[str]]:
    """Each matmul of the Transformer (its module name) and the HF weights it fuses, in order;
    `names`: the HF names at hand (the output reuses the embedding when there is no lm_head)."""
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attention.wqkv"] = [p + f"self_attn.{n}_proj.weight" for n in "qkv"]
        out[f"layers.{i}.attention.wo"] = [p + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w13"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        out[f"layers.{i}.feed_forward.w2"] = [p + "mlp.down_proj.weight"]
    out["output"] = ["lm_head.weight" if "lm_head.weight" in names else "model.embed_tokens.weight"]
    return out
