"""Read a llama.cpp GGUF file into a ModelConfig + HF-named float32 state dict.

Every tensor is dequantised with `gguf.quants.dequantize` into the float state dict (what
prefill and the GPU compute with); Q4_0, Q4_1 and Q8_0 tensors are also kept as the file's
blocks (quantization.BlockWeight), which CPU decode steps read as such (--quantization auto).
llama.cpp's converter permutes the rows of Q and K so its rope kernel can rotate
adjacent pairs; we undo that (as transformers' GGUF loader does) to get back the
HF layout whose rope rotates the two halves of each head.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from engram_runtime.config import ModelConfig
from engram_runtime.quantization import FILE_TYPES, BlockWeight, from_gguf
from engram_runtime.weights import ModelLoadError

SUPPORTED_ARCHITECTURES = ("llama",)
# float types plus every block quantisation gguf.quants can dequantise
SUPPORTED_TYPES = {
    t
    for t in GGMLQuantizationType
    if t.name in ("F32", "F16", "BF16")
    or t.name.startswith(("Q4_", "Q5_", "Q6_", "Q2_K", "Q3_K", "IQ", "TQ"))
    or t.name == "Q8_0"
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: GGUFReader, key: str, path: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise ModelLoadError(f"{path}: GGUF metadata key '{key}' is missing")
    return field.contents()


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.{i}.{kind}.weight
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp convert_hf_to_gguf's `permute` for Q/K rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_config(reader: GGUFReader, path: str) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported architecture '{arch}' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    hidden = int(_field(reader, f"{arch}.embedding_length", path))
    heads = int(_field(reader, f"{arch}.attention.head_count", path))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size", path, default=len(tokens.data) if tokens else None)
    eos = reader.fields.get("tokenizer.ggml.eos_token_id")
    bos = reader.fields.get("tokenizer.ggml.bos_token_id")
    names = {t.name for t in reader.tensors}
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length", path)),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count", path)),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", path, default=heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", path, default=hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", path, default=10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", path, default=1e-5)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", path, default=2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=int(bos.contents()) if bos else None,
        eos_token_ids=[int(eos.contents())] if eos else [],
        name=str(_field(reader, "general.name", path, default="model")),
    )


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, BlockWeight]]:
    """config, the float state dict and the file's Q4_0 / Q4_1 / Q8_0 blocks, both by HF name."""
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # truncated / not a GGUF file
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    config = read_config(reader, path)
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise ModelLoadError(
                f"{path}: tensor '{t.name}' has unsupported quantisation type {t.tensor_type.name}"
            )
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockWeight] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: derived from rope_theta here
        w = dequantize(t.data, t.tensor_type)
        heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
        n_head = next((n for part, n in heads.items() if part in t.name), None)
        if n_head is not None:
            w = _unpermute_rope(w, n_head)
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32))  # copy: the reader maps the file read-only
        if t.tensor_type.name in FILE_TYPES and t.data.ndim == 2:
            b = from_gguf(t.data, t.tensor_type.name)
            blocks[name] = b if n_head is None else b.rows(_unpermute_rope(np.arange(w.shape[0]), n_head))
    return config, state, blocks
