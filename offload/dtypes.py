"""Table dtypes: how a logical row of `head_dim` float values is stored on disk and in memory.

Every table is stored as a 2-D array of *raw* rows, one row per table row, so a gather is
always one contiguous read per row (one index_select / numpy take), whatever the dtype:

- ``float32``:  raw row = head_dim float32 values.
- ``bfloat16``: raw row = head_dim bfloat16 values (kept as uint16 in numpy, which has no bf16).
- ``fp8_e4m3``: the DeepSeek-V4.1 layout: head_dim float8 e4m3 bytes followed by one ue8m0
  scale byte per 32 values (the scale is the power of two 2**(byte - 127)). A 256-value row is
  256 + 8 = 264 bytes. Rows are dequantised only AFTER the gather, on the compute device, so the
  slow tier moves 1.03 bytes per value instead of 2 or 4.

Why power-of-two scales: multiplying by 2**k is exact in float32, so dequantisation adds no
rounding beyond the e4m3 cast, and one byte per block is enough to store the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FP8_BLOCK = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
_UE8M0_BIAS = 127

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "fp8_e4m3": "fp8_e4m3", "fp8": "fp8_e4m3", "float8_e4m3": "fp8_e4m3",
}


@dataclass(frozen=True)
class TableDType:
    """Storage description of one table dtype (see module docstring)."""

    name: str                 # canonical name as written in engram.json
    torch_raw: torch.dtype    # element type of the raw row array in torch
    numpy_raw: np.dtype       # element type of the raw row array in numpy (bf16 -> uint16)
    safetensors_raw: str      # safetensors dtype tag of the stored raw array

    def raw_row_elems(self, head_dim: int) -> int:
        """Number of raw elements per stored row."""
        if self.name == "fp8_e4m3":
            return head_dim + head_dim // FP8_BLOCK
        return head_dim

    def head_dim(self, raw_row_elems: int) -> int:
        """Values per row of a raw row of raw_row_elems elements (raw_row_elems' inverse)."""
        return raw_row_elems * FP8_BLOCK // (FP8_BLOCK + 1) if self.name == "fp8_e4m3" else raw_row_elems

    def row_bytes(self, head_dim: int) -> int:
        return self.raw_row_elems(head_dim) * self.numpy_raw.itemsize

    def check_head_dim(self, head_dim: int) -> None:
        if self.name == "fp8_e4m3" and head_dim % FP8_BLOCK:
            raise ValueError(f"fp8_e4m3 tables need head_dim divisible by {FP8_BLOCK}, got {head_dim}")

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """float32 [n, head_dim] -> raw rows [n, raw_row_elems] (CPU, contiguous)."""
        values = values.detach().to("cpu", torch.float32).contiguous()
        if self.name == "float32":
            return values
        if self.name == "bfloat16":
            return values.to(torch.bfloat16)
        return _fp8_encode(values)

    def decode(self, raw: torch.Tensor, compute_dtype: torch.dtype) -> torch.Tensor:
        """raw rows [n, raw_row_elems] -> NEW tensor [n, head_dim] in compute_dtype, same device.

        Always returns fresh memory, so callers may recycle `raw` (a staging buffer) at once.
        On CPU the common cases run in numpy (single-threaded; see offload.device.take_rows):
        bf16 -> fp32 is a 16-bit shift, fp8 a 256-entry lookup table times 2**exponent.
        """
        if raw.device.type == "cpu" and compute_dtype == torch.float32:
            return torch.from_numpy(self._decode_np(raw.numpy() if self.name != "bfloat16"
                                                    else raw.view(torch.int16).numpy()))
        if self.name == "fp8_e4m3":
            return _fp8_decode(raw).to(compute_dtype)
        return raw.to(compute_dtype, copy=True)

    def _decode_np(self, raw: np.ndarray) -> np.ndarray:
        if self.name == "float32":
            return raw.copy()
        if self.name == "bfloat16":
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        n, elems = raw.shape
        head_dim = elems * FP8_BLOCK // (FP8_BLOCK + 1)
        values = _E4M3_TABLE[raw[:, :head_dim]].reshape(n, head_dim // FP8_BLOCK, FP8_BLOCK)
        exponent = raw[:, head_dim:].astype(np.int32) - _UE8M0_BIAS
        return np.ldexp(values, exponent[:, :, None]).reshape(n, head_dim)


_E4M3_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()

_DTYPES = {
    "float32": TableDType("float32", torch.float32, np.dtype(np.float32), "F32"),
    "bfloat16": TableDType("bfloat16", torch.bfloat16, np.dtype(np.uint16), "BF16"),
    "fp8_e4m3": TableDType("fp8_e4m3", torch.uint8, np.dtype(np.uint8), "U8"),
}


def table_dtype(name: str) -> TableDType:
    """Look up a table dtype by its name or a common alias ('bf16', 'fp8', ...)."""
    canonical = DTYPE_ALIASES.get(str(name).lower())
    if canonical is None:
        raise ValueError(f"unknown table dtype {name!r}; choose one of float32, bfloat16, fp8_e4m3")
    return _DTYPES[canonical]


def _fp8_encode(values: torch.Tensor) -> torch.Tensor:
    n, head_dim = values.shape
    blocks = values.reshape(n, head_dim // FP8_BLOCK, FP8_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # smallest power of two with amax / scale <= FP8_MAX; all-zero blocks get scale 1
    exponent = torch.ceil(torch.log2(torch.clamp(amax, min=torch.finfo(torch.float32).tiny) / FP8_MAX))
    exponent = torch.where(amax > 0, exponent, torch.zeros_like(exponent))
    exponent = exponent.clamp(-_UE8M0_BIAS, 255 - _UE8M0_BIAS)
    scaled = blocks / torch.exp2(exponent).unsqueeze(-1)
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8).reshape(n, head_dim)
    scale_bytes = (exponent + _UE8M0_BIAS).to(torch.uint8)
    return torch.cat([q, scale_bytes], dim=1)


def _fp8_decode(raw: torch.Tensor) -> torch.Tensor:
    n, elems = raw.shape
    head_dim = elems * FP8_BLOCK // (FP8_BLOCK + 1)
    q = raw[:, :head_dim].contiguous().view(torch.float8_e4m3fn).to(torch.float32)
    exponent = raw[:, head_dim:].to(torch.float32) - _UE8M0_BIAS
    scale = torch.exp2(exponent).repeat_interleave(FP8_BLOCK, dim=1)
    return q * scale
