"""Quantised weights: the file's blocks are its values, the block kernel computes their matmul,
and an engine serving them decodes what the dense model of the same values decodes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize as gguf_quantize

import engram_kernels as kernels
from engram_runtime.engine import LLMEngine
from engram_runtime.engine_config import EngineConfig
from engram_runtime.llm import LLM
from engram_runtime.model import BF16_DOT_MAX_ROWS, QuantizedLinear, linear_sources
from engram_runtime.model_runner import Chunk
from engram_runtime.quantization import cat_rows, from_gguf, linear_blocks, quantize
from engram_runtime.sampling import SamplingParams


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.available(), "the native kernels did not build (see the log for the compiler error)"


def test_the_files_blocks_dequantize_to_ggufs_own_values(default_gguf_path):
    tensors = {t.name: t for t in GGUFReader(default_gguf_path).tensors}
    for name in ("blk.0.ffn_down.weight", "token_embd.weight"):  # Q4_1 and Q8_0
        t = tensors[name]
        assert torch.equal(from_gguf(t.data, t.tensor_type.name).dequantize(),
                           torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32)))


def test_q4_0_blocks_dequantize_to_ggufs_values():
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType.Q4_0)
    assert torch.equal(from_gguf(raw, "Q4_0").dequantize(),
                       torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_0).astype(np.float32)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_rounds_each_value_to_its_blocks_nearest_step(mode):
    w = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    blocks = quantize(w, mode)
    step = blocks.scales.repeat_interleave(32, dim=1)
    assert ((blocks.dequantize() - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: past the kernel's 8 rows per pass over the weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [160, 576])  # 5 and 18 blocks
def test_block_linear_is_the_matmul_of_the_dequantized_weight(mode, rows, dtype, k):
    g = torch.Generator().manual_seed(rows)
    blocks = quantize(torch.randn(200, k, generator=g), mode)
    x = torch.randn(rows, k, generator=g).to(dtype)
    expected = x.float() @ blocks.dequantize().T
    got = kernels.block_linear(x, blocks.qs, blocks.scales, blocks.mins, blocks.bits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def needs_bf16_dot():
    if not kernels.block_linear_bf16_fast():
        pytest.skip("block_linear_bf16 needs a CPU with AVX-512 BF16")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 16, 19])  # 19: past the kernel's 16 rows per pass over the weight
def test_block_linear_bf16_is_the_dense_bfloat16_matmul(mode, rows):
    needs_bf16_dot()
    g = torch.Generator().manual_seed(rows)
    blocks = quantize(torch.randn(200, 576, generator=g), mode)
    x = torch.randn(rows, 576, generator=g)
    expected = x.bfloat16().float() @ blocks.dequantize().bfloat16().float().T
    got = kernels.block_linear_bf16(x, blocks.qs, blocks.scales, blocks.mins, blocks.bits)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)


def test_the_block_kernel_is_built_for_this_cpus_vector_unit():
    """-march=native: AVX-512 where the CPU has it, else AVX2 with FMA, else the plain loop."""
    flags = kernels.cpu_flags()
    expected = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "generic"
    assert kernels.native().block_linear_isa() == expected
    assert kernels.block_linear_bf16_fast() == ("avx512_bf16" in flags)


def test_fused_and_reordered_blocks_keep_their_rows():
    g = torch.Generator().manual_seed(2)
    a, b = quantize(torch.randn(6, 64, generator=g), "int4"), quantize(torch.randn(4, 64, generator=g), "int4")
    order = torch.randperm(10, generator=g)
    fused = cat_rows([a, b]).rows(order)
    assert torch.equal(fused.dequantize(), torch.cat([a.dequantize(), b.dequantize()])[order])


def test_quantization_modes_pick_blocks_by_their_bits(loaded_model):
    sd, sources = loaded_model.state_dict, linear_sources(loaded_model.config, loaded_model.state_dict)
    auto = linear_blocks(sources, sd, loaded_model.blocks, "auto")
    assert len(auto) == len(sources)  # the file: Q4_1 layers, a Q8_0 tied output
    assert {b.kind for b in auto.values()} == {"Q4_1", "Q8_0"}
    assert linear_blocks(sources, sd, loaded_model.blocks, "none") == {}
    assert linear_blocks(sources, sd, loaded_model.blocks, "int8")["output"].kind == "Q8_0"  # already 8 bits
    int4 = linear_blocks(sources, sd, loaded_model.blocks, "int4")
    assert int4["output"].kind == "int4" and int4["layers.0.feed_forward.w2"].kind == "Q4_1"
    dense = linear_blocks(sources, sd, {}, "int8")  # a float model quantised
    assert {b.kind for b in dense.values()} == {"int8"}


@pytest.fixture(scope="module")
def greedy(loaded_model, prompt_ids):
    params = SamplingParams(max_tokens=24, temperature=0)

    def run(quantization: str, dtype: str = "float32") -> list[list[int]]:
        llm = LLM(loaded=loaded_model, quantization=quantization, dtype=dtype, max_num_seqs=4, max_model_len=256)
        return [llm.generate([p], params)[0].token_ids for p in prompt_ids]  # alone: one row, the blocks' path

    return run


def test_serving_the_files_blocks_decodes_what_its_dequantized_weights_decode(greedy, monkeypatch):
    monkeypatch.setattr(kernels, "block_linear_fast", lambda: True)  # CI's plain-loop build too
    calls = []
    real = kernels.block_linear
    monkeypatch.setattr(kernels, "block_linear", lambda *a: calls.append(1) or real(*a))
    assert greedy("auto") == greedy("none")
    assert calls, "decode steps did not read the blocks"


@pytest.mark.parametrize("fast", [True, False])
def test_auto_serves_the_files_blocks_only_where_the_kernel_is_faster(loaded_model, monkeypatch, fast):
    monkeypatch.setattr(kernels, "block_linear_fast", lambda: fast)
    engine = LLM(loaded=loaded_model, max_num_seqs=2, max_model_len=64).engine
    quantized = [m for m in engine.runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert engine.quantization == ("Q4_1,Q8_0" if fast else "none")
    assert len(quantized) == (len(linear_sources(loaded_model.config, loaded_model.state_dict)) if fast else 0)


def test_a_model_quantized_to_int8_decodes_close_to_its_float_weights(loaded_model, prompt_ids, greedy):
    """int8 of the file's dequantised values (its Q8_0 output kept): the same first tokens."""
    float_only = LLM(loaded=type(loaded_model)(loaded_model.path, loaded_model.config, loaded_model.state_dict,
                                               loaded_model.tokenizer), quantization="int8", max_num_seqs=4,
                     max_model_len=256)
    assert isinstance(float_only.engine.runner.model.output, QuantizedLinear)
    params = SamplingParams(max_tokens=8, temperature=0)
    got = [float_only.generate([p], params)[0].token_ids for p in prompt_ids]
    assert [t[:4] for t in got] == [t[:4] for t in greedy("none")][: len(got)]


def test_bfloat16_steps_of_a_few_rows_read_the_blocks_as_the_dense_copy_would(loaded_model, prompt_ids,
                                                                             monkeypatch):
    """A decode step of a few rows in bfloat16 reads the blocks (block_linear_bf16), with the dense bfloat16
    copy's arithmetic: its logits stray from float32's as far as the dense copy's do. (Not further: each
    matmul's output is rounded to bfloat16, so a different order of sums flips roundings that 30 layers
    carry on, and the two bfloat16 paths do not agree more closely than that.)"""
    needs_bf16_dot()
    rows = []
    real = kernels.block_linear_bf16
    monkeypatch.setattr(kernels, "block_linear_bf16", lambda x, *a: rows.append(len(x)) or real(x, *a))
    prompts = [p for p in prompt_ids if len(p) > 1][:4]

    def decode_logits(quantization: str, dtype: str) -> torch.Tensor:
        runner = LLMEngine(EngineConfig(quantization=quantization, dtype=dtype, max_num_seqs=4, max_model_len=64),
                           loaded_model).runner
        runner.forward([Chunk(i, p[:-1], 0) for i, p in enumerate(prompts)])
        return runner.forward([Chunk(i, p[-1:], len(p) - 1) for i, p in enumerate(prompts)]).float()

    dense, dense32 = decode_logits("none", "bfloat16"), decode_logits("none", "float32")
    assert not rows
    blocks = decode_logits("auto", "bfloat16")
    assert set(rows) == {len(prompts)} and 2 <= len(prompts) <= BF16_DOT_MAX_ROWS
    assert (blocks - dense32).abs().mean() < 1.5 * (dense - dense32).abs().mean()
