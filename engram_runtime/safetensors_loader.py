"""Read a Hugging Face model directory (config.json + *.safetensors) of a Llama model."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from engram_runtime.config import ModelConfig
from engram_runtime.weights import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def read_hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{cfg_file}: missing (a model directory needs config.json + *.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg_file}: invalid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{cfg_file}: unsupported architecture '{model_type}' (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    # transformers >= 5 nests rope settings in rope_parameters; older files use rope_theta/rope_scaling
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ModelLoadError(f"{cfg_file}: unsupported rope scaling {rope} (only plain RoPE is implemented)")
    heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    try:
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[int(e) for e in eos_ids],
            name=path.name,
        )
    except KeyError as exc:
        raise ModelLoadError(f"{cfg_file}: missing field {exc}") from exc


def load_hf_dir(path_str: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    path = Path(path_str)
    config = read_hf_config(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors ({exc})") from exc
        state.update({k: v.float() for k, v in part.items()})
    return config, state
