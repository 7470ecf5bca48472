"""cache_attention: a decode step's attention over the KV cache on the GPU, in Triton.

One new query per row attends to positions 0..pos of its own cache slot. The cache is one static
tensor [slots, kv_heads, max_len, head_dim] (engram_runtime/model.py), so the kernel reads each
row's slot in place and only up to its position: torch's scaled_dot_product_attention would
need the batch's slots gathered into a copy, and a CUDA graph would make that copy the full
max_len long every step. Programs run per (row, KV head) and hold the query heads that share
that KV head (grouped-query attention without repeating K/V), with an online softmax in float32.

cache_attention is a torch custom op with a fake implementation, so a decode step that calls it
traces under FakeTensorMode and can be captured in a CUDA graph. The kernel runs in Triton's
CPU interpreter in the tests (triton_backend.interpreted()), against the torch path it replaces
(engram_runtime.model.decode_attention over the gathered slots).
"""
from __future__ import annotations

import functools

import torch

from engram_kernels.triton_backend import choose_backend, triton

if triton is not None:
    import triton.language as tl

_BLOCK_L = 32  # cache positions per loop iteration


def available(device: torch.device) -> bool:
    """Whether the kernel can run on tensors of this device (CUDA, or the interpreter on CPU)."""
    return choose_backend(device) == "triton"


@torch.library.custom_op("engram::cache_attention", mutates_args=())
def cache_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    positions: torch.Tensor) -> torch.Tensor:
    """q [R, H, D] (RoPE applied), k_cache and v_cache [S, KV, L, D] with this step's K/V already
    written, slots and positions [R] int64 -> [R, H, D] in q's dtype: softmax(q k^T / sqrt(D)) v
    over positions 0..positions[r] of slot slots[r]. H must be a multiple of KV."""
    _check(q, k_cache, v_cache, slots, positions)
    rows, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    out = torch.empty_like(q)
    if rows == 0:
        return out
    group = heads // kv_heads
    kernel = _kernel(triton.knobs.runtime.interpret)
    kernel[(rows, kv_heads)](
        q, k_cache, v_cache, slots, positions, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), head_dim ** -0.5,
        GROUP=group, BLOCK_G=max(triton.next_power_of_2(group), 2), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_L=_BLOCK_L)
    return out


@cache_attention.register_fake
def _cache_attention_fake(q, k_cache, v_cache, slots, positions):
    _check(q, k_cache, v_cache, slots, positions)
    return torch.empty_like(q)


def _check(q, k_cache, v_cache, slots, positions) -> None:
    """What can be checked without reading data (positions inside the cache are the caller's)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"cache_attention: q [R, H, D] and caches [S, KV, L, D] needed, got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[1] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"cache_attention: {q.shape[1]} query heads of dim {q.shape[2]} do not fit "
                         f"{k_cache.shape[1]} KV heads of dim {k_cache.shape[3]}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("cache_attention: the head dimension must be contiguous")
    if slots.shape != (q.shape[0],) or positions.shape != (q.shape[0],):
        raise ValueError(f"cache_attention: slots and positions must be [{q.shape[0]}]")
    if len({t.device for t in (q, k_cache, v_cache, slots, positions)}) != 1:
        raise ValueError("cache_attention: every tensor must be on one device")


@functools.cache
def _kernel(interpret: bool):
    """The kernel, jitted once per mode: triton picks interpreter or compiler at decoration time."""
    return triton.jit(_attention_kernel)


def _attention_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, pos_ptr, out_ptr, q_row, q_head, k_slot, k_head, k_pos,
                      v_slot, v_head, v_pos, out_row, out_head, scale, GROUP: tl.constexpr,
                      BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr):
    """Row program_id(0), KV head program_id(1): its GROUP query heads over the slot's positions
    0..pos, BLOCK_L positions at a time, with a running max and sum (online softmax)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    pos = tl.load(pos_ptr + row)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    q_mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row * q_row + heads[:, None] * q_head + d[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale
    k_base = k_ptr + slot * k_slot + kv_head * k_head
    v_base = v_ptr + slot * v_slot + kv_head * v_head
    best = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for start in range(0, pos + 1, BLOCK_L):
        at = start + tl.arange(0, BLOCK_L)
        live = at <= pos
        kv_mask = live[:, None] & (d < HEAD_DIM)[None, :]
        k = tl.load(k_base + at[:, None] * k_pos + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_L]
        scores = tl.where(live[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        p = tl.exp(scores - new_best[:, None])
        keep = tl.exp(best - new_best)
        v = tl.load(v_base + at[:, None] * v_pos + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * keep[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        total = total * keep + tl.sum(p, axis=1)
        best = new_best
    out = acc / total[:, None]
    tl.store(out_ptr + row * out_row + heads[:, None] * out_head + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=q_mask)
