"""The runtime computes what transformers computes from the same GGUF file."""
from __future__ import annotations

import torch

from engram_runtime.model_runner import Chunk
from engram_runtime.sampling import SamplingParams


def test_logits_match_transformers(hf_model, runner, prompt_ids):
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)  # several lengths
    for ids in prompt_ids:
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0]
        mine = runner.forward([Chunk(0, ids, 0)], all_logits=True)[0]
        assert mine.shape == ref.shape
        assert (mine - ref).abs().max().item() <= 1e-3, len(ids)


def test_greedy_32_tokens_match_transformers_generate(hf_model, llm, prompt_ids):
    outs = llm.generate(prompt_ids, SamplingParams(max_tokens=32, temperature=0))
    for ids, out in zip(prompt_ids, outs):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=2, pad_token_id=2
            )[0, len(ids) :].tolist()
        assert out.token_ids == ref
