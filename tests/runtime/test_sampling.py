"""Sampling: seeds, filters, stops, logprobs."""
from __future__ import annotations

import pytest
import torch

from engram_runtime.sampling import SamplingParams, argmax, inverse_cdf, sample


def draw(logits, params, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample(logits[None], [params], [g]).token_ids[0] for _ in range(n)]


def test_sampler_follows_the_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    counts = torch.bincount(torch.tensor(draw(logits, SamplingParams(), 4000)), minlength=4).float() / 4000
    assert (counts - logits.softmax(-1)).abs().max().item() < 0.03
    hot = torch.bincount(torch.tensor(draw(logits, SamplingParams(temperature=0.25), 500)), minlength=4)
    assert hot[3] > 450  # low temperature sharpens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [49152, 5000, 1024])  # blocked (SmolLM2's), not a multiple, small
def test_blocked_argmax_is_the_first_maximum(dtype, vocab):
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)
    logits[1, [7, vocab - 1]] = 50.0  # ties across blocks: the first wins
    logits[2, [vocab // 2, vocab // 2 + 1]] = 50.0  # ties inside a block
    logits[3] = 0.0
    logits[4, vocab - 3] = float("nan")  # a NaN row: its NaN, as torch's own reductions do
    expected = torch.tensor([int(torch.nonzero(row == row.max())[0]) if not row.isnan().any()
                             else int(row.isnan().nonzero()[0]) for row in logits.float()])
    assert torch.equal(argmax(logits), expected)
    assert torch.equal(argmax(logits), logits.max(dim=-1).indices)


@pytest.mark.parametrize("vocab", [49152, 5000])  # blocked (SmolLM2's), and the plain cumulative sum
def test_inverse_cdf_picks_where_the_running_sum_reaches_the_draw(vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(8, vocab, generator=g) ** 4
    probs[1, : vocab // 2] = 0.0  # mass only in the second half
    probs[2:4] = 0.0
    probs[2:4, [3, vocab - 2]] = 1.0  # two tokens, far apart: u (0.25, 0.75) decides between them
    u = torch.tensor([0.0, 0.3, 0.25, 0.75, 0.5, 0.999999, 0.1, 0.9], dtype=torch.float64)
    cdf = probs.double().cumsum(dim=-1)
    expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    got = inverse_cdf(probs, u)
    assert got[1] >= vocab // 2 and got[2] == 3 and got[3] == vocab - 2
    assert torch.equal(got, expected)  # as a float64 running sum of the whole row would pick


def test_top_k_and_top_p_filter():
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0])
    assert set(draw(logits, SamplingParams(top_k=2), 300)) == {0, 1}
    probs = logits.softmax(-1)  # 0.35, 0.32, 0.29, ...: top_p 0.6 keeps the first two
    assert probs[0] < 0.6 < probs[:2].sum()
    assert set(draw(logits, SamplingParams(top_p=0.6), 300)) == {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.01), 50)) == {0}
    assert draw(logits, SamplingParams(top_k=1, temperature=5.0), 20) == [0] * 20


def test_seed_gives_same_output_alone_and_in_a_batch(llm, prompt_ids):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    alone = llm.generate([prompt_ids[1]], p)[0].token_ids
    others = [SamplingParams(max_tokens=16, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    batch = llm.generate([prompt_ids[0], prompt_ids[1], prompt_ids[2], prompt_ids[3]],
                         [others[0], p, others[1], others[2]])
    assert batch[1].token_ids == alone
    other_seed = SamplingParams(max_tokens=16, temperature=1.0, seed=99, ignore_eos=True)
    assert llm.generate([prompt_ids[1]], other_seed)[0].token_ids != alone


def test_stop_string_is_not_emitted(llm, prompt_ids):
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = llm.generate([prompt_ids[2]], greedy)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    got = llm.generate([prompt_ids[2]], SamplingParams(max_tokens=24, temperature=0, stop=[stop]))[0]
    assert got.finish_reason == "stop"
    assert got.text == full[: full.index(stop)]
    assert stop not in got.text


def test_stop_token_ids_and_ignore_eos(llm, prompt_ids):
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    ref = llm.generate([prompt_ids[1]], greedy)[0]
    target = ref.token_ids[5]
    first = ref.token_ids.index(target)
    got = llm.generate([prompt_ids[1]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[target]))[0]
    assert got.finish_reason == "stop" and got.token_ids == ref.token_ids[: first + 1]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 20


def test_eos_stops_unless_ignored(llm, tokenizer):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    out = llm.generate([list(chat)], SamplingParams(max_tokens=100, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and len(out.token_ids) < 100
    assert "<|im_end|>" not in out.text


def test_logprobs(llm, prompt_ids):
    out = llm.generate([prompt_ids[1]], SamplingParams(max_tokens=5, temperature=0, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp["token_id"] == tok and lp["logprob"] <= 0
        assert len(lp["top"]) == 3 and max(lp["top"].values()) == pytest.approx(lp["logprob"])
        assert lp["top"][tok] == pytest.approx(lp["logprob"])  # greedy: the chosen token is the best


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(logprobs=99),
                                 dict(stop=[""])])
def test_invalid_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
