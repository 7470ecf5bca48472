"""bench.peer_model: the GGUF exported as a Hugging Face directory reads back, through
engram_runtime's own safetensors loader, as the same model: the same config, the GGUF's
weights rounded to bfloat16, and the same greedy text in bfloat16 (where both hold the same
numbers), with the tokenizer and chat template intact."""
from __future__ import annotations

import json

import pytest
import torch

from bench.peer_model import STAMP, export_hf
from engram_runtime.llm import LLM
from engram_runtime.sampling import SamplingParams
from engram_runtime.weights import load_model

pytestmark = pytest.mark.slow  # two loads of the model and an export: ~1 min on 2 cores

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_gguf_path, loaded_model):
    return export_hf(default_gguf_path, tmp_path_factory.mktemp("export") / "hf", loaded=loaded_model)


def test_export_reads_back_as_the_same_model(exported, loaded_model):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", STAMP):
        assert (exported / name).is_file(), name
    back = load_model(str(exported))
    gguf_cfg = {k: v for k, v in loaded_model.config.to_dict().items() if k != "name"}
    back_cfg = {k: v for k, v in back.config.to_dict().items() if k != "name"}
    assert back_cfg.pop("rms_norm_eps") == pytest.approx(gguf_cfg.pop("rms_norm_eps"), rel=1e-6)  # float32 in GGUF
    assert back_cfg == gguf_cfg
    assert set(back.state_dict) == set(loaded_model.state_dict)
    for name, w in loaded_model.state_dict.items():
        assert torch.equal(back.state_dict[name], w.to(torch.bfloat16).float()), name
    tok = back.tokenizer
    assert tok.eos_token == loaded_model.tokenizer.eos_token and tok.chat_template
    for p in PROMPTS:
        assert tok(p, add_special_tokens=False).input_ids == loaded_model.tokenizer(p, add_special_tokens=False).input_ids
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        loaded_model.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_export_gives_the_same_greedy_text(exported, loaded_model):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    kw = {"dtype": "bfloat16", "quantization": "none", "max_num_seqs": 4, "max_model_len": 256}
    want = [o.token_ids for o in LLM(loaded=loaded_model, **kw).generate(PROMPTS, params)]
    got = [o.token_ids for o in LLM(model=str(exported), **kw).generate(PROMPTS, params)]
    assert got == want


def test_export_is_cached(exported, default_gguf_path):
    mtime = (exported / "model.safetensors").stat().st_mtime_ns
    assert export_hf(default_gguf_path, exported) == exported
    assert (exported / "model.safetensors").stat().st_mtime_ns == mtime
