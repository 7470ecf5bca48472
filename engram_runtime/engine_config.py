"""EngineConfig: what an engine is asked to serve, and how `auto` device and dtype resolve.

Kept apart from the engine's loop (engine.py): the server's CLI, app and data-parallel parent
build and pass configs; only the engine runs them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engram_runtime.model_runner import parse_dtype

DEFAULT_MAX_MODEL_LEN = 2048  # cap for the static KV cache when the model allows more


@dataclass
class EngineConfig:
    model: str | None = None  # GGUF file or HF dir; None = default SmolLM2
    engram: str | None = None  # Engram checkpoint dir or None
    device: str = "auto"  # "cpu", "cuda", "cuda:N"; auto: CUDA when torch sees a GPU
    dtype: str = "auto"  # "float32", "bfloat16"; auto: bfloat16 on CUDA, float32 on the CPU
    table_placement: str = "host"
    table_dtype: str | None = None
    engram_host_read: str = "uva"  # on CUDA, host tables read by the GPU itself, or "staging"
    cache_rows: int = 0
    prefetch: bool | None = None  # rows fetched ahead; None: where it pays (EngramRunner)
    verify_tables: bool = False
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # None: min(model context, DEFAULT_MAX_MODEL_LEN)
    gpu_memory_utilization: float = 0.9  # share of the GPU's memory this engine may use (CUDA)
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    quantization: str = "auto"  # CPU decode weights: auto (the file's blocks where faster), none, int8, int4


def resolve_device(name: str) -> str:
    """The device an EngineConfig.device names ("auto": CUDA when torch sees a GPU)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """The compute dtype an EngineConfig.dtype names on `device` ("auto": bfloat16 on CUDA)."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return parse_dtype(name)
