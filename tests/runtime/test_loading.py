"""Model files: clear refusals, and the HF safetensors path against transformers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.model_runner import ModelRunner, Chunk
from engram_runtime.weights import ModelLoadError, load_model, load_weights


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        LLMEngine(EngineConfig(model=str(missing)))


def _write_gguf(path, arch: str, tensor_type: GGMLQuantizationType | None = None):
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_context_length(64)
    w.add_vocab_size(32)
    if tensor_type is None:
        w.add_tensor("token_embd.weight", np.zeros((32, 32), dtype=np.float32))
    else:  # one 32-value block per row, in the type's own byte size
        nbytes = GGML_QUANT_SIZES[tensor_type][1]
        w.add_tensor("token_embd.weight", np.zeros((32, nbytes), dtype=np.uint8), raw_dtype=tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_gguf(path, "gpt2")
    with pytest.raises(ModelLoadError, match=r"gpt2\.gguf.*unsupported architecture 'gpt2'"):
        load_weights(str(path))


def test_unsupported_quantisation(tmp_path):
    path = tmp_path / "q81.gguf"
    _write_gguf(path, "llama", GGMLQuantizationType.Q8_1)
    with pytest.raises(ModelLoadError, match=r"q81\.gguf.*token_embd.weight.*unsupported quantisation type Q8_1"):
        load_weights(str(path))


def test_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="junk.gguf"):
        load_weights(str(path))


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory, tokenizer):
    """A random, untied Llama in HF layout (config.json + safetensors + tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
                      max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path, model


def test_hf_directory_matches_transformers(tiny_hf_dir):
    path, model = tiny_hf_dir
    loaded = load_model(str(path))
    assert not loaded.config.tie_word_embeddings and loaded.config.rope_theta == 5000.0
    runner = ModelRunner(loaded.config, loaded.state_dict, torch.float32, 1, 64)
    ids = [5, 17, 300, 42, 7, 7, 1000]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    got = runner.forward([Chunk(0, ids, 0)], all_logits=True)[0]
    assert (got - ref).abs().max().item() <= 1e-4
    assert loaded.tokenizer("hello").input_ids


def test_hf_directory_errors(tmp_path, tiny_hf_dir):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_weights(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"config.json.*unsupported architecture 'gpt2'"):
        load_weights(str(tmp_path))
