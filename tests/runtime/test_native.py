"""The native decode kernel equals the torch ops it replaces, cache writes included."""
from __future__ import annotations

import pytest
import torch

from engram_runtime import native
from engram_runtime.model import apply_rope, decode_attention
from engram_runtime.model_runner import ModelRunner, Row

H, KV, D, SLOTS, LEN = 9, 3, 64, 6, 40


@pytest.fixture(scope="module", autouse=True)
def built():
    assert native.available(), "the native kernels did not build (see the log for the compiler error)"


def torch_decode(qkv, cos, sin, k_cache, v_cache, slots, positions):
    """The same step with torch ops: RoPE, index_copy_ into the caches, masked attention."""
    R = qkv.shape[0]
    q = apply_rope(qkv[:, :H], cos[:, None], sin[:, None])
    k = apply_rope(qkv[:, H : H + KV], cos[:, None], sin[:, None])
    rows = ((slots[:, None] * KV + torch.arange(KV)) * LEN + positions[:, None]).reshape(-1)
    k_cache.view(-1, D).index_copy_(0, rows, k.reshape(-1, D))
    v_cache.view(-1, D).index_copy_(0, rows, qkv[:, H + KV :].reshape(-1, D))
    n = int(positions.max()) + 1
    mask = torch.zeros(R, 1, 1, n).masked_fill_(torch.arange(n) > positions[:, None, None, None], float("-inf"))
    return decode_attention(q[:, None], k_cache[slots, :, :n], v_cache[slots, :, :n], mask).view(R, H, D)


def test_kernel_matches_torch_on_scattered_slots_and_positions():
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, SLOTS, KV, LEN, D, generator=g)
    slots, positions = torch.tensor([4, 0, 5, 2]), torch.tensor([0, 17, 39, 5])
    qkv = torch.randn(4, H + 2 * KV, D, generator=g)
    angles = torch.rand(4, D // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want = torch_decode(qkv, cos, sin, k_ref, v_ref, slots, positions)
    got = native.decode_attention(qkv, cos, sin, k_cache, v_cache, slots, positions)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(k_cache, k_ref, atol=1e-6, rtol=0)  # new keys rotated, nothing else touched
    assert torch.equal(v_cache, v_ref)


def test_kernel_rejects_a_position_outside_the_cache():
    caches = torch.zeros(2, SLOTS, KV, LEN, D)
    cos = sin = torch.zeros(1, D)
    with pytest.raises(RuntimeError, match="outside the cache"):
        native.decode_attention(torch.zeros(1, H + 2 * KV, D), cos, sin, caches[0], caches[1],
                                torch.tensor([0]), torch.tensor([LEN]))


def test_native_and_torch_runners_decode_the_same_logits(loaded_model, runner, prompt_ids):
    plain = ModelRunner(loaded_model.config, loaded_model.state_dict, torch.float32, 4, 256, native_kernels=False)
    assert runner.native and not plain.native
    a, b = prompt_ids[3][:20], prompt_ids[1]
    for r in (runner, plain):
        r.forward([Row(1, a[:-1], 0), Row(3, b[:-1], 0)])
    got = runner.forward([Row(1, a[-1:], len(a) - 1), Row(3, b[-1:], len(b) - 1)])
    want = plain.forward([Row(1, a[-1:], len(a) - 1), Row(3, b[-1:], len(b) - 1)])
    assert (got - want).abs().max().item() <= 1e-4
