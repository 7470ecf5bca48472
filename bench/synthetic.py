"""Models made on the machine: a Llama-family backbone of a given shape with random weights, a
tokenizer of numbered tokens, and Engram memory whose tables live in memory (of any size, never
written to disk). For machines where nothing can be downloaded and little can be brought along
(the lent GPU machine: scripts/gpu_check.py), and for the tests of that script on the CPU.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from engram_runtime.compression import CompressedTokenizer
from engram_runtime.config import ModelConfig
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.engram_runner import EngramRunner
from engram_runtime.hashing import NgramHasher
from engram_runtime.weights import LoadedModel
from offload.device import ComputeDevice
from offload.store import TableSet

SHAPES = {
    "smollm2-135m": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                                tie_word_embeddings=True, name="smollm2-135m-shaped"),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                             max_position_embeddings=8192, tie_word_embeddings=False, name="llama3-8b-shaped"),
    "tiny": ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, name="tiny"),
}


def numbered_tokenizer(vocab_size: int):
    """A fast tokenizer whose token i is the word "t{i}": enough for the engine's detokenizer and
    Engram's compressed vocabulary (every token distinct)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0")


def random_model(shape: str, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """HF-named random weights of SHAPES[shape], made on `device` in `dtype` (an 8B shape is 16 GB of
    bfloat16: made on the GPU, never on the host), and the numbered tokenizer."""
    c = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)

    def w(*size: int, scale: float = 0.02) -> torch.Tensor:
        return torch.randn(size, generator=gen, device=device, dtype=dtype) * scale

    sd = {"model.embed_tokens.weight": w(c.vocab_size, c.hidden_size),
          "model.norm.weight": torch.ones(c.hidden_size, device=device, dtype=dtype)}
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = w(c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
        for name, rows in (("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size)):
            sd[p + f"self_attn.{name}_proj.weight"] = w(rows, c.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = w(c.hidden_size, c.q_size)
        sd[p + "mlp.gate_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        sd[p + "mlp.up_proj.weight"] = w(c.intermediate_size, c.hidden_size)
        sd[p + "mlp.down_proj.weight"] = w(c.hidden_size, c.intermediate_size)
    return LoadedModel(f"<random {shape}>", replace(c), sd, numbered_tokenizer(c.vocab_size))


def engram_config(table_bytes: int, layer_ids: list[int], head_dim: int = 64, heads: int = 8) -> EngramConfig:
    """Orders 2 and 3 with `heads` heads each of `head_dim` bfloat16 values, and about table_bytes
    of rows per layer."""
    rows_per_head = max(31, table_bytes // (2 * heads * head_dim * 2))
    return EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3,
                        n_embed_per_ngram=head_dim * heads, n_head_per_ngram=heads, layer_ids=layer_ids, pad_id=0)


def engram_memory(cfg: EngramConfig, model: LoadedModel, device: ComputeDevice, placement: str, num_slots: int,
                  dtype: torch.dtype, host_read: str = "uva", rows: dict[int, torch.Tensor] | None = None,
                  seed: int = 0) -> tuple[EngramRunner, dict[int, torch.Tensor]]:
    """(an EngramRunner, its tables' raw rows): zero-valued bfloat16 tables of cfg's sizes in GPU
    memory (placement device) or in host memory (host: page-locked on CUDA), or `rows` made
    before (one host copy serves several runners), and random dense weights."""
    hasher = NgramHasher(cfg, CompressedTokenizer(np.arange(model.config.vocab_size)))
    if rows is None:
        rows = {}
        for lid in cfg.layer_ids:
            shape = (hasher.num_rows[lid], cfg.head_dim)
            if placement == "device":
                rows[lid] = torch.zeros(shape, dtype=torch.bfloat16, device=device.torch_device)
            else:
                rows[lid] = device.alloc_host(shape, torch.bfloat16, f"the synthetic table of layer {lid}").zero_()
    tables = TableSet.from_tensors(rows, "bfloat16", placement, device, dtype)
    torch.manual_seed(seed)
    layers = {lid: EngramLayer(cfg, lid, model.config.hidden_size) for lid in cfg.layer_ids}
    return EngramRunner(layers, hasher, tables, num_slots, dtype, host_read=host_read), rows
