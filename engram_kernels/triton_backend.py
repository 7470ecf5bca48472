"""Where the Triton kernels run: on CUDA tensors, and on CPU tensors in Triton's interpreter when
a test asks for it (``interpreted()``), to check each kernel against its torch path without a GPU.

The interpreter works only if TRITON_INTERPRET=1 was set before triton was first imported (the
standard library's jitted functions, tl.sum and tl.zeros among them, are made at import), which
tests/conftest.py does; CPU tensors still take the torch paths unless inside ``interpreted()``.
"""
from __future__ import annotations

import contextlib

import torch

try:
    import triton
except ImportError:  # every kernel's torch path serves
    triton = None

_on_cpu = False


def choose_backend(device: torch.device) -> str:
    """"triton" for CUDA tensors, or for CPU tensors inside interpreted(); "torch" otherwise or
    without triton."""
    if triton is None:
        return "torch"
    if device.type == "cuda" or (device.type == "cpu" and _on_cpu and triton.knobs.runtime.interpret):
        return "triton"
    return "torch"


@contextlib.contextmanager
def interpreted():
    """Run the kernels on CPU tensors, in Triton's interpreter, while inside."""
    global _on_cpu
    before, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = before
