"""Native CPU kernels, compiled once per machine with torch's C++ extension builder.

torch runs a decode step's attention as dozens of small ops per layer whose fixed
costs dominate on a 2-core CPU (engram_runtime/csrc/decode_attention.cpp says which).
The fused kernel does it in one pass. It is built on first use (about 15 s, cached in
torch's extension directory, shared by later processes) with the system C++ compiler.
Without a compiler, or with ENGRAM_SERVE_NATIVE=0, `available()` is False and the
model runs the torch implementation of the same maths.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / "decode_attention.cpp"]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


@functools.cache
def available() -> bool:
    """Builds (or loads the cached build of) the kernels; False if they cannot be used."""
    if os.environ.get("ENGRAM_SERVE_NATIVE", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load

        log.info("loading native kernels (the first build on a machine takes ~15 s)")
        load("engram_serve_native", [str(s) for s in SOURCES], extra_cflags=CFLAGS,
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, failed build: the torch path still works
        log.warning("native kernels unavailable, using torch ops instead: %s", e)
        return False
    return True


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE + KV-cache write + attention for one new token per row (see the kernel's header).
    qkv [R, H + 2 KV, D] float32 before RoPE, cos/sin [R, D] -> [R, H, D]."""
    return torch.ops.engram_serve.decode_attention(qkv, cos, sin, k_cache, v_cache, slots, positions)

