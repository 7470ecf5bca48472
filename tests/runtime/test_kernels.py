"""The native kernels equal the torch ops they replace (cache writes included), and a
model run with them decodes what it decodes without them."""
from __future__ import annotations

import pytest
import torch

import engram_kernels as kernels
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.model import AttentionInputs, DecodeInputs, apply_rope, decode_attention
from engram_runtime.model_runner import Chunk

H, KV, D, SLOTS, LEN = 9, 3, 64, 6, 40


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.available(), "the native kernels did not build (see the log for the compiler error)"


def torch_decode(qkv, cos, sin, k_cache, v_cache, slots, positions):
    """The same step with torch ops: RoPE, index_copy_ into the caches, masked attention."""
    R, D = qkv.shape[0], qkv.shape[-1]
    q = apply_rope(qkv[:, :H], cos[:, None], sin[:, None])
    k = apply_rope(qkv[:, H : H + KV], cos[:, None], sin[:, None])
    rows = ((slots[:, None] * KV + torch.arange(KV)) * LEN + positions[:, None]).reshape(-1)
    k_cache.view(-1, D).index_copy_(0, rows, k.reshape(-1, D).to(k_cache.dtype))
    v_cache.view(-1, D).index_copy_(0, rows, qkv[:, H + KV :].reshape(-1, D).to(v_cache.dtype))
    n = int(positions.max()) + 1
    mask = torch.zeros(R, 1, 1, n).masked_fill_(torch.arange(n) > positions[:, None, None, None], float("-inf"))
    keys, values = k_cache[slots, :, :n].float(), v_cache[slots, :, :n].float()
    return decode_attention(q[:, None], keys, values, mask).view(R, H, D)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 80])  # compiled for 64 and 128; 80 takes the generic loop
def test_decode_attention_matches_torch_on_scattered_slots_and_positions(cache_dtype, head_dim):
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, SLOTS, KV, LEN, head_dim, generator=g).to(cache_dtype)
    slots, positions = torch.tensor([4, 0, 5, 2]), torch.tensor([0, 17, 39, 5])
    qkv = torch.randn(4, H + 2 * KV, head_dim, generator=g).to(cache_dtype)
    angles = torch.rand(4, head_dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, dim=-1)
    sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    ulp = 1e-6 if cache_dtype == torch.float32 else 2**-7  # rounding to the dtype may differ by one ulp
    want = torch_decode(qkv.float(), cos, sin, k_ref, v_ref, slots, positions)
    got = kernels.decode_attention(qkv, cos, sin, k_cache, v_cache, slots, positions)
    assert got.dtype == cache_dtype
    torch.testing.assert_close(got.float(), want.to(cache_dtype).float(), atol=1e-5, rtol=max(1e-4, ulp))
    torch.testing.assert_close(k_cache.float(), k_ref.float(), atol=1e-6, rtol=ulp)  # new keys, nothing else
    assert torch.equal(v_cache, v_ref)


def test_decode_attention_rejects_a_position_outside_the_cache():
    caches = torch.zeros(2, SLOTS, KV, LEN, D)
    cos = sin = torch.zeros(1, D)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.decode_attention(torch.zeros(1, H + 2 * KV, D), cos, sin, caches[0], caches[1],
                                 torch.tensor([0]), torch.tensor([LEN]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_and_silu_match_torch(dtype):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(5, 3, 576, generator=g) * 3, torch.rand(576, generator=g) + 0.5
    delta = torch.randn(5, 3, 576, generator=g).to(dtype)
    gate_up = torch.randn(7, 2 * 1536, generator=g).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    with torch.inference_mode():
        want = x * (x.pow(2).mean(-1, keepdim=True) + 1e-5).rsqrt() * w
        torch.testing.assert_close(kernels.rms_norm(x, w, 1e-5, dtype), want.to(dtype), **tol)
        s, h = kernels.add_rms_norm(x.clone(), delta, w, 1e-5, dtype)
        torch.testing.assert_close(s, x + delta.float(), atol=0, rtol=0)
        torch.testing.assert_close(h, kernels.rms_norm(x + delta.float(), w, 1e-5, dtype), atol=0, rtol=0)
        gate, up = gate_up.float().chunk(2, dim=-1)
        got = kernels.silu_and_mul(gate_up, dtype)
        assert got.dtype == dtype and got.shape == (7, 1536)
        torch.testing.assert_close(got, (gate * torch.sigmoid(gate) * up).to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [None, torch.float32, torch.bfloat16])
def test_small_linear_matches_float64(dtype, bias):
    """Every row against float64 of the same (rounded) inputs; the output is float32 always."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 1024, generator=g).to(dtype), torch.randn(1152, 1024, generator=g).to(dtype)
    b = None if bias is None else torch.randn(1152, generator=g).to(bias)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    for m in (1, 3):
        got = kernels.small_linear(x[:m], w, b)
        assert got.dtype == torch.float32 and got.shape == (m, 1152)
        torch.testing.assert_close(got.double(), want[:m], atol=1e-3, rtol=1e-4)


def test_model_decodes_the_same_logits_with_and_without_kernels(runner, prompt_ids, monkeypatch):
    """Kernels on, then off as a user switches them off (ENGRAM_SERVE_NATIVE=0): the same
    prefill and decode step of two sequences give the same logits."""
    a, b = prompt_ids[3][:20], prompt_ids[1]
    prefill = [Chunk(1, a[:-1], 0), Chunk(3, b[:-1], 0)]
    decode = [Chunk(1, a[-1:], len(a) - 1), Chunk(3, b[-1:], len(b) - 1)]
    logits = []
    for switch, inputs in (("1", DecodeInputs), ("0", AttentionInputs)):
        monkeypatch.setenv("ENGRAM_SERVE_NATIVE", switch)
        kernels.native.cache_clear()
        runner.forward(prefill)
        with torch.inference_mode():
            assert isinstance(runner.attention_inputs(decode)[1], inputs)
        logits.append(runner.forward(decode))
    kernels.native.cache_clear()  # the next call sees the environment monkeypatch restores
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4


def test_engram_mix_kernel_matches_torch():
    """Decode steps of an Engram layer with two branches through the kernel and through
    EngramLayer.mix: the same outputs, gates and per-slot conv store."""
    cfg = EngramConfig(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1],
                       hc_mult=2)
    torch.manual_seed(3)
    layer = EngramLayer(cfg, 1, hidden_size=24, hc_mult=2)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    hidden = torch.randn(3, 5, 2, 24)
    slots = torch.tensor([5, 0, 2])
    with torch.no_grad():
        memory = layer.memory(torch.randn(3, 5, cfg.heads_total, cfg.head_dim))
        start = torch.randn(6, cfg.conv_state_len, 2 * 24)
        weights = layer.mix_weights()
        runs = []
        for native in (True, False):
            store = start.clone()
            outs, gates = [], []
            for t in range(5):
                if native:
                    out, gate = kernels.engram_mix(hidden[:, t].contiguous(), memory[:, t].contiguous(), store, slots,
                                                   weights)
                    outs.append(out[:, None])
                    gates.append(gate[:, None])
                else:
                    outs.append(layer.mix(hidden[:, t : t + 1], memory[:, t : t + 1], store, slots=slots))
                    gates.append(layer.last_gate)
            runs.append((torch.cat(outs, 1), torch.cat(gates, 1), store))
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_native_kernels_refuse_tensors_off_the_cpu():
    """A tensor that is not on the CPU never reaches a native loop over host pointers: the
    kernel names itself and the device (a meta tensor stands in for a CUDA one here), and the
    dispatching wrappers take the torch ops for it."""
    x = torch.zeros(2, 8, device="meta")
    with pytest.raises(RuntimeError, match="rms_norm is a CPU kernel, got a tensor on meta"):
        kernels.native().rms_norm(x, torch.ones(8), 1e-6, torch.float32)
    with pytest.raises(RuntimeError, match="gather_rows is a CPU kernel"):
        kernels.gather_rows(torch.zeros(4, 8), torch.zeros(2, dtype=torch.long, device="meta"), torch.float32)
    with torch.no_grad():
        assert not kernels.enabled(x) and kernels.enabled(torch.zeros(1))
        assert kernels.rms_norm(x, torch.ones(8, device="meta"), 1e-6, torch.bfloat16).dtype == torch.bfloat16
