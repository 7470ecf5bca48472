"""The GPU decode attention kernel (engram_kernels/triton_attention.py) against the torch path it
replaces, in Triton's CPU interpreter (triton_backend.interpreted() for this module's tests): grouped
query heads, scattered slots, positions at the cache's start, its end and across its blocks."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from engram_kernels.triton_attention import cache_attention
from engram_kernels.triton_backend import interpreted
from engram_runtime.model import decode_attention
from tests.fake_cuda import fake_cuda

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreter():
    with interpreted():
        yield


def torch_path(q, k_cache, v_cache, slots, positions):
    """What the model computes without the kernel: the slots gathered, a mask past each position."""
    keys, values = (c.index_select(0, slots).float() for c in (k_cache, v_cache))
    allowed = torch.arange(k_cache.shape[2])[None, :] <= positions[:, None]
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, None, None]
    return decode_attention(q.float()[:, None], keys, values, mask)[:, 0]


@requires_triton
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 1, 128)])
def test_kernel_equals_the_torch_path(dtype, atol, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    slots_total, cache_len = 7, 70  # positions cross the kernel's 32-position blocks
    k_cache, v_cache = (torch.randn(slots_total, kv_heads, cache_len, head_dim, generator=g).to(dtype) for _ in "kv")
    q = torch.randn(5, heads, head_dim, generator=g).to(dtype)
    slots = torch.tensor([6, 0, 3, 5, 1])
    positions = torch.tensor([0, 31, 32, 69, 45])
    got = cache_attention(q, k_cache, v_cache, slots, positions)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), torch_path(q, k_cache, v_cache, slots, positions), rtol=0, atol=atol)


@requires_triton
def test_kernel_reads_nothing_past_a_rows_position():
    """Garbage (NaN) past each row's position and in other slots changes nothing."""
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(3, 2, 40, 16, generator=g) for _ in "kv")
    q = torch.randn(2, 4, 16, generator=g)
    slots, positions = torch.tensor([2, 0]), torch.tensor([5, 20])
    clean = cache_attention(q, k_cache, v_cache, slots, positions)
    for cache in (k_cache, v_cache):
        cache[1] = float("nan")
        cache[2, :, 6:] = float("nan")
        cache[0, :, 21:] = float("nan")
    assert torch.equal(cache_attention(q, k_cache, v_cache, slots, positions), clean)


def test_bad_shapes_are_refused_and_the_op_traces_on_fake_cuda():
    with pytest.raises(ValueError, match="9 query heads of dim 64 do not fit 2 KV heads"):
        cache_attention(torch.zeros(1, 9, 64), torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64),
                        torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with fake_cuda() as census:
        q = torch.empty(3, 9, 64, device="cuda", dtype=torch.bfloat16)
        cache = torch.empty(4, 3, 16, 64, device="cuda", dtype=torch.bfloat16)
        index = torch.zeros(3, dtype=torch.long, device="cuda")
        out = cache_attention(q, cache, cache, index, index)
        assert out.device.type == "cuda" and out.shape == q.shape and not census.transfers
