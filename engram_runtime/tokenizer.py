"""Tokenizer + chat template from the same GGUF file or HF directory as the weights.

transformers builds a fast tokenizer from the GGUF's embedded vocabulary and
merges (and reads `tokenizer.chat_template`), so no hub access is needed.
"""
from __future__ import annotations

import os
from pathlib import Path

from engram_runtime.weights import ModelLoadError, is_gguf


def load_tokenizer(path: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub at run time
    from transformers import AutoTokenizer

    p = Path(path)
    try:
        if is_gguf(path):
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot load the tokenizer ({exc})") from exc


def eos_token_ids(tokenizer, model_eos: list[int]) -> frozenset[int]:
    """EOS ids from the model config plus the tokenizer's own (chat models often end
    turns with a different token than the config's eos)."""
    ids = set(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
