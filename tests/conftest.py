"""Shared, expensive fixtures (session scope): the default GGUF and its load.

Other areas use them too: `default_gguf_path` (str), `loaded_model`
(engram_runtime.weights.LoadedModel: config, float32 HF-named state dict,
tokenizer) and `tokenizer`. Build engines from `loaded_model` to skip the
~10 s GGUF parse: `LLMEngine(EngineConfig(max_num_seqs=4, max_model_len=256), loaded_model)`
or `LLM(loaded=loaded_model, max_model_len=256)`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a plain clone without `pip install -e .`
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton's CPU interpreter for the kernels' tests: set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from engram_runtime.weights import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def loaded_model(default_gguf_path):
    from engram_runtime.weights import load_model

    return load_model(default_gguf_path)


@pytest.fixture(scope="session")
def tokenizer(loaded_model):
    return loaded_model.tokenizer


@pytest.fixture
def ckpt_factory(tmp_path):
    """make_checkpoint(**kw) in a fresh folder of tmp_path per call (tests/small_checkpoint.py)."""
    from tests.small_checkpoint import make_checkpoint

    counter = iter(range(1000))
    return lambda **kw: make_checkpoint(tmp_path / f"ckpt{next(counter)}", **kw)
