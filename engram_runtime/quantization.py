"""Weights in llama.cpp's 32-value blocks, kept as such for the decode kernel (block_linear).

Two layouts cover the GGUF types served quantised: 4 bits with a scale and a minimum per block
(Q4_1, and Q4_0 as a minimum of -8 scales) and 8 bits with a scale (Q8_0). The blocks are the
file's own bits, rearranged once at load into a quantised array and float32 scales, so a
model served from its GGUF computes with the very weights the file holds. `quantize` makes the
same blocks from float weights: `--quantization int8` (Q8_0) and `int4` (Q4_1) for any model.
`dequantize` is the torch reference the kernel is tested against, and what every other path
(large batches, the GPU) computes with.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import engram_kernels as kernels

BLOCK = 32
QUANTIZATIONS = ("auto", "none", "int8", "int4")
FILE_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF types kept quantised; others are dequantised at load


@dataclass
class BlockWeight:
    """A weight [N, K] in blocks of 32 values along K. bits 4: qs uint8 [N, K/2] (block b of a row
    is bytes 16b..16b+16, byte j holds value j in its low nibble and j+16 in its high one), w =
    scale * q + min; bits 8: qs int8 [N, K], w = scale * q. scales, mins float32 [N, K/32]."""

    bits: int
    qs: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    kind: str  # where the blocks came from: a GGUF type name, or the mode that quantised them

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales.shape[0], self.scales.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.scales, self.mins) if t is not None)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K], in the order of operations gguf.quants uses (scale * q, then + min)."""
        n, k = self.shape
        if self.bits == 8:
            q = self.qs.view(n, -1, BLOCK).float()
            return (q * self.scales[..., None]).view(n, k)
        qs = self.qs.view(n, -1, BLOCK // 2)
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k)

    def rows(self, order: torch.Tensor | np.ndarray) -> "BlockWeight":
        """The weight with its rows (output features) in `order`: blocks run along K, so a row
        permutation (llama.cpp's Q/K rope order undone) moves whole rows of blocks."""
        order = torch.as_tensor(order)
        mins = None if self.mins is None else self.mins[order].contiguous()
        return BlockWeight(self.bits, self.qs[order].contiguous(), self.scales[order].contiguous(), mins, self.kind)


def cat_rows(parts: list[BlockWeight]) -> BlockWeight:
    """Weights stacked along N (fused q/k/v, gate/up); all of one layout."""
    bits = {p.bits for p in parts}
    if len(bits) != 1:
        raise ValueError(f"cannot fuse weights of {sorted(bits)} bits")
    mins = None if parts[0].mins is None else torch.cat([p.mins for p in parts])
    return BlockWeight(parts[0].bits, torch.cat([p.qs for p in parts]), torch.cat([p.scales for p in parts]), mins,
                       "+".join(sorted({p.kind for p in parts})))


def from_gguf(data: np.ndarray, type_name: str) -> BlockWeight:
    """A GGUF tensor's raw blocks (uint8 [N, bytes per row], as gguf's reader maps them) of type
    Q4_0 (fp16 scale, 16 bytes), Q4_1 (fp16 scale, fp16 min, 16 bytes) or Q8_0 (fp16 scale, 32
    int8)."""
    n = data.shape[0]
    head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[type_name]
    size = head + (BLOCK if type_name == "Q8_0" else BLOCK // 2)
    blocks = np.ascontiguousarray(data).reshape(n, -1, size)
    scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., head:].reshape(n, -1).copy())
    if type_name == "Q8_0":
        return BlockWeight(8, qs.view(torch.int8), scales, None, type_name)
    if type_name == "Q4_0":  # w = scale * (q - 8)
        return BlockWeight(4, qs, scales, -8 * scales, type_name)
    mins = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    return BlockWeight(4, qs, scales, mins, type_name)


def quantize(weight: torch.Tensor, mode: str) -> BlockWeight:
    """Float weight [N, K] (K a multiple of 32) -> blocks: "int8" as Q8_0 (scale max|w| / 127),
    "int4" as Q4_1 (the block's range in 15 steps from its minimum), both rounded to nearest."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // BLOCK, BLOCK)
    if mode == "int8":
        scales = w.abs().amax(-1) / 127
        q = torch.round(w / torch.where(scales > 0, scales, 1)[..., None]).clamp_(-127, 127)
        return BlockWeight(8, q.to(torch.int8).view(n, k), scales, None, mode)
    if mode != "int4":
        raise ValueError(f"quantize: mode must be int8 or int4, got {mode!r}")
    lo, hi = w.amin(-1), w.amax(-1)
    scales = (hi - lo) / 15
    q = torch.round((w - lo[..., None]) / torch.where(scales > 0, scales, 1)[..., None]).clamp_(0, 15).to(torch.uint8)
    qs = q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)
    return BlockWeight(4, qs.reshape(n, k // 2).contiguous(), scales, lo, mode)


def quantizable(weight_shape: tuple[int, ...]) -> bool:
    """Whether a weight can be held in blocks: a matrix whose rows are whole blocks."""
    return len(weight_shape) == 2 and weight_shape[1] % BLOCK == 0


def serving_mode(mode: str) -> str:
    """The mode an engine serves when asked for `mode`: "auto" reads the file's blocks only where
    the block kernel beats the dense matmul (its AVX-512 and AVX2 builds; docs/performance.md), else
    serves dense weights; the other modes are served as asked."""
    return mode if mode != "auto" or kernels.block_linear_fast() else "none"


def linear_blocks(sources: dict[str, list[str]], state_dict: dict[str, torch.Tensor],
                  file_blocks: dict[str, BlockWeight], mode: str) -> dict[str, BlockWeight]:
    """The blocks each matmul computes with under `mode`, by matmul name; sources: each matmul's
    HF weights in fusing order (model.linear_sources). "none": none; "auto": the file's own; "int8"
    / "int4": at most 8 / 4 bits, so a weight the file holds in as few bits or fewer stays as it
    is and a wider one is quantised (Q8_0 / Q4_1) from its float values. A matmul whose parts end
    up in different layouts, or not all in blocks, stays dense."""
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {mode!r}")
    limit = {"none": 0, "auto": None, "int8": 8, "int4": 4}[mode]
    out = {}
    for name, parts in sources.items():
        blocks = []
        for part in parts:
            b = file_blocks.get(part) if limit != 0 else None
            if limit and (b is None or b.bits > limit) and quantizable(tuple(state_dict[part].shape)):
                b = quantize(state_dict[part], mode)
            blocks.append(b)
        if all(b is not None for b in blocks) and len({b.bits for b in blocks}) == 1:
            out[name] = cat_rows(blocks) if len(blocks) > 1 else blocks[0]
    return out


def kinds(blocks: dict[str, BlockWeight]) -> str:
    """The block kinds a model serves, "none" without blocks ("Q4_1,Q8_0": /version)."""
    return ",".join(sorted({k for b in blocks.values() for k in b.kind.split("+")})) or "none"


def describe(blocks: dict[str, BlockWeight]) -> str:
    """One log line: how many matmuls read blocks, of which kinds, and their bytes."""
    if not blocks:
        return "no quantized weights"
    counts: dict[str, int] = {}
    for b in blocks.values():
        counts[b.kind] = counts.get(b.kind, 0) + 1
    total = sum(b.nbytes for b in blocks.values()) / 2**20
    return (f"{len(blocks)} matmuls read quantized blocks in decode steps ("
            + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) + f"; {total:.0f} MiB)")
