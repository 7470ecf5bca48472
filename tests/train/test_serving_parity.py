"""Training and serving agree: a trained checkpoint's logits in engram-eval equal the engine's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engram_runtime.llm import LLM
from engram_runtime.sampling import SamplingParams
from train.engram_model import open_engram_lm


def test_trained_checkpoint_logprobs_equal_the_engines(trained):
    cfg, _ = trained
    tiny_model, engram = cfg.model, cfg.engram
    lm = open_engram_lm(tiny_model, Path(engram))
    prompt = lm.encode(["def function_3_7(value):\n    return value"])[0]
    llm = LLM(model=tiny_model, engram=engram, max_model_len=128)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    assert len(out.token_ids) == 6
    ids = np.asarray([prompt + out.token_ids], dtype=np.int64)
    with torch.no_grad():
        logp = torch.log_softmax(lm.logits(torch.from_numpy(ids), lm.embeddings(ids))[0], dim=-1)
        logp_backbone = torch.log_softmax(lm.logits(torch.from_numpy(ids), None)[0], dim=-1)
    for k, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        pos = len(prompt) - 1 + k
        assert lp["token_id"] == tok == int(logp[pos].argmax())
        assert abs(lp["logprob"] - float(logp[pos, tok])) < 1e-4
        for t, v in lp["top"].items():
            assert abs(v - float(logp[pos, int(t)])) < 1e-4
    # the memory is trained: it changes the distribution (so the agreement above is not vacuous)
    assert float((logp - logp_backbone).abs().max()) > 1e-2
