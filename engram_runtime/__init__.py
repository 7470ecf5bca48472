"""What an Engram model is and how it computes: the stable API of engram-serve.

Everything a user or a checkpoint trained with DeepSeek's reference layout needs
is importable from here; submodules are implementation detail.
"""
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.hashing import NgramHasher
from engram_runtime.llm import LLM, CompletionOutput
from engram_runtime.sampling import SamplingParams

__all__ = [
    "CompletionOutput",
    "CompressedTokenizer",
    "EngramConfig",
    "EngramLayer",
    "LLM",
    "NgramHasher",
    "SamplingParams",
]
