"""Fixtures of the training tests: a tiny random Llama with the real SmolLM2 tokenizer.

Training is exercised end to end through the real code (runtime Transformer, EngramLayer,
NgramHasher, table files, checkpoint manifest), only on a backbone small enough that a
step takes milliseconds: 4 layers of width 64, random weights, vocabulary and tokenizer of
SmolLM2 (so hashing and compression are the real ones).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engram_runtime.checkpoint import backbone_info, init_checkpoint
from engram_runtime.engram_config import EngramConfig
from train.trainer import TrainConfig, train

TINY = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
        "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("tiny_llama")
    (d / "config.json").write_text(json.dumps(TINY))
    g = torch.Generator().manual_seed(0)
    h, i, q, kv = TINY["hidden_size"], TINY["intermediate_size"], 64, 32
    sd = {"model.embed_tokens.weight": torch.randn(TINY["vocab_size"], h, generator=g) * 0.5,
          "model.norm.weight": torch.ones(h)}
    for n in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name, shape in [("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))]:
            sd[p + name + ".weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        sd[p + "input_layernorm.weight"] = torch.ones(h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h)
    save_file(sd, str(d / "model.safetensors"))
    tokenizer.save_pretrained(str(d))     # the shared session tokenizer (tests/conftest.py)
    return d


def make_engram(tmp_path: Path, tiny_model: Path, dtype: str = "float32") -> Path:
    cfg = EngramConfig(engram_vocab_size=[3001, 3001], max_ngram_size=3, n_embed_per_ngram=32,
                       n_head_per_ngram=2, layer_ids=[1, 2], pad_id=2, seed=0, kernel_size=4)
    out = tmp_path / "engram"
    init_checkpoint(out, cfg, backbone_info(str(tiny_model)), dtype=dtype, progress=False)
    return out


def write_corpus(root: Path) -> Path:
    """A small code corpus with repeated idioms (what an N-gram memory can learn), in three
    projects (top-level folders) of four modules each."""
    for i in range(12):
        body = "".join(f"def function_{i}_{k}(value):\n    return value * {k} + {i}\n\n" for k in range(40))
        project = root / f"project_{i % 3}"
        project.mkdir(parents=True, exist_ok=True)
        (project / f"module_{i}.py").write_text(body)
    return root


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_model) -> tuple[TrainConfig, dict]:
    """One short training (bfloat16 tables) shared by the tests of its result."""
    tmp = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(tmp / "corpus")
    cfg = TrainConfig(engram=str(make_engram(tmp, tiny_model, dtype="bfloat16")), corpus=[str(corpus)],
                      model=str(tiny_model), tokens=2 * 32 * 30, seq_len=32, batch_size=2, eval_every=10,
                      ckpt_every=100, eval_tokens=256, heldout_fraction=0.25, heldout_projects=0.3, warmup_steps=2,
                      table_lr=0.2, dense_lr=1e-2, progress=False)
    return cfg, train(cfg)
