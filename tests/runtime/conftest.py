"""Runtime test fixtures: transformers' model of the same GGUF (the oracle), loaded once."""
from __future__ import annotations

import os

import pytest
import torch

from engram_runtime.llm import LLM
from engram_runtime.model_runner import ModelRunner

PROMPTS = [
    "Hello",
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he",
]


@pytest.fixture(scope="session")
def hf_model(default_gguf_path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(default_gguf_path), gguf_file=os.path.basename(default_gguf_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def runner(loaded_model) -> ModelRunner:
    """A float32 runner with 4 KV slots of 256 positions."""
    return ModelRunner(loaded_model.config, loaded_model.state_dict, torch.float32, 4, 256)


@pytest.fixture(scope="session")
def llm(loaded_model) -> LLM:
    return LLM(loaded=loaded_model, max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
