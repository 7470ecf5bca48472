"""KV-cache decoding equals full forwards; batching and chunking change nothing."""
from __future__ import annotations

import pytest
import torch

from engram_runtime.llm import LLM
from engram_runtime.model_runner import ModelRunner, Chunk
from engram_runtime.sampling import SamplingParams


def test_token_by_token_equals_full_forward(runner, prompt_ids):
    ids = prompt_ids[3][:24]
    full = runner.forward([Chunk(1, ids, 0)], all_logits=True)[0]
    steps = [runner.forward([Chunk(2, ids[:5], 0)], all_logits=True)[0]]
    steps += [runner.forward([Chunk(2, [t], i)]) for i, t in enumerate(ids[5:], start=5)]
    inc = torch.cat(steps)
    assert (inc - full).abs().max().item() <= 1e-4


def test_padded_batch_rows_equal_single_rows(runner, prompt_ids):
    """One padded forward over rows of different lengths, slots and start positions."""
    a, b = prompt_ids[3][:20], prompt_ids[2][:9]
    runner.forward([Chunk(3, a[:12], 0)])  # slot 3 already holds a prefix of `a`
    batch = runner.forward([Chunk(3, a[12:], 12), Chunk(0, b, 0)])
    alone_a = runner.forward([Chunk(1, a, 0)])
    alone_b = runner.forward([Chunk(2, b, 0)])
    assert (batch[0] - alone_a[0]).abs().max().item() <= 1e-4
    assert (batch[1] - alone_b[0]).abs().max().item() <= 1e-4


def test_packed_rows_equal_the_padded_batch(runner, prompt_ids):
    """A step of a decoding row, a continued prompt and a new one: packed, the token-wise work
    covers the 1 + 8 + 9 real tokens, not 3 rows of 9, with the padded batch's logits."""
    a, b = prompt_ids[3][:20], prompt_ids[2][:9]
    runner.forward([Chunk(1, a[:12], 0)])
    runner.forward([Chunk(0, b, 0)])
    chunks = [Chunk(0, b[-1:], len(b)), Chunk(1, a[12:], 12), Chunk(2, b, 0)]
    _, attn, logits_index = runner.attention_inputs(chunks, pack=True)
    assert attn.packed.tolist() == [0, *range(9, 17), *range(18, 27)] and logits_index.tolist() == [0, 8, 17]
    packed = runner.forward(chunks)
    padded = runner.forward(chunks, all_logits=True)  # all_logits never packs
    rows = torch.stack([padded[0, 0], padded[1, 7], padded[2, 8]])
    assert (packed - rows).abs().max().item() <= 1e-4


def test_scattered_slots_read_by_gather(loaded_model, runner, prompt_ids):
    """Slots far apart (range > 2x batch) take the gather path; same logits."""
    wide = ModelRunner(loaded_model.config, loaded_model.state_dict, torch.float32, 8, 64)
    a, b = prompt_ids[1], prompt_ids[2][:10]
    got = wide.forward([Chunk(7, a, 0), Chunk(0, b, 0)])
    assert (got[0] - runner.forward([Chunk(0, a, 0)])[0]).abs().max().item() <= 1e-4
    assert (got[1] - runner.forward([Chunk(0, b, 0)])[0]).abs().max().item() <= 1e-4


def test_batch_of_different_lengths_decodes_as_each_alone(llm, prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    batched = llm.generate(prompt_ids, params)
    for ids, out in zip(prompt_ids, batched):
        assert llm.generate([ids], params)[0].token_ids == out.token_ids


def test_chunked_prefill_and_tiny_batches_give_same_output(loaded_model, llm, prompt_ids):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(prompt_ids, params)]
    small = LLM(loaded=loaded_model, max_num_seqs=2, max_num_batched_tokens=7, max_model_len=256)
    assert [o.token_ids for o in small.generate(prompt_ids, params)] == ref


def test_bfloat16_close_to_float32(loaded_model, runner, prompt_ids):
    bf = ModelRunner(loaded_model.config, loaded_model.state_dict, torch.bfloat16, 2, 128)
    for ids in prompt_ids:
        ref = runner.forward([Chunk(0, ids, 0)])[0]
        got = bf.forward([Chunk(0, ids, 0)])[0].float()
        # bf16 keeps ~3 significant digits: compare the log-probabilities of the likely tokens
        top = ref.topk(20).indices
        diff = got.log_softmax(-1)[top] - ref.log_softmax(-1)[top]
        assert diff.abs().max().item() < 0.5
        assert got.argmax().item() == ref.argmax().item()


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bfloat16_generation_is_fluent(loaded_model, dtype):
    llm = LLM(loaded=loaded_model, dtype=dtype, max_num_seqs=2, max_model_len=128)
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))[0]
    assert "Paris" in out.text


def test_a_cpu_whose_onednn_cannot_pack_bfloat16_falls_back_to_plain_linears(monkeypatch):
    """CI's CPU lacks AVX-512, where oneDNN refuses to reorder a bfloat16 weight: PackedLinear
    then computes with F.linear, with the same results."""
    from engram_runtime import model

    def refuse(weight):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx512bw")

    model._packs.cache_clear()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    try:
        w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
        linear = model.PackedLinear(w)
        assert linear.packed is None
        x = torch.randn(3, 16)
        assert torch.equal(linear(x), torch.nn.functional.linear(x.bfloat16(), w))
    finally:
        model._packs.cache_clear()
