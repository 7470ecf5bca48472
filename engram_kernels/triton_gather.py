"""gather_rows: an Engram layer's rows read from a table and decoded in one GPU kernel (Triton).

On CUDA the table may be a UVA view of page-locked host memory (offload/uva.py), where every
read crosses PCIe: so one kernel reads each requested row once and writes it decoded, rather
than a gather into a staging copy and a decode pass over it. Raw rows are offload/dtypes.py's
(this package sits below offload/ and names them by string): float32; bfloat16; fp8_e4m3,
head_dim e4m3 bytes then one ue8m0 scale byte, 2**(byte - 127), per 32 values.

Every conversion is integer bit work (e4m3 -> float32, the ue8m0 scale, float32 -> bfloat16
rounded to nearest even), so the kernel gives torch's bits on any GPU and in Triton's CPU
interpreter, whose own fp8 and bfloat16 casts differ from torch's (NaN codes, truncation).

gather_rows is a torch custom op (engram::gather_rows) with a fake implementation: a step that
calls it traces under FakeTensorMode (which also checks that table and rows share a device),
and it can be captured in a CUDA graph once an eager call has compiled the kernel. The torch
path (index_select + decode) runs where the kernel cannot: choose_backend says which runs.
"""
from __future__ import annotations

import functools

import torch

from engram_kernels.triton_backend import choose_backend, triton

if triton is not None:
    import triton.language as tl

TABLE_DTYPES = ("float32", "bfloat16", "fp8_e4m3")
OUT_DTYPES = (torch.float32, torch.bfloat16)
FP8_BLOCK = 32
_UE8M0_ZERO_BITS = 0x00400000  # float32 bits of 2**-127, the scale of byte 0 (a subnormal)
_KIND = {"float32": 0, "bfloat16": 1, "fp8_e4m3": 2}
_TILE = 4096  # elements per program: rows per program = _TILE // head_dim (a power of two)


def head_dim_of(table_dtype: str, raw_row_elems: int) -> int:
    """Values per row of a raw row of `raw_row_elems` elements (fp8: 33 bytes per 32 values)."""
    if table_dtype not in TABLE_DTYPES:
        raise ValueError(f"gather_rows: unknown table dtype {table_dtype!r}; choose one of {TABLE_DTYPES}")
    if table_dtype != "fp8_e4m3":
        return raw_row_elems
    if raw_row_elems % (FP8_BLOCK + 1):
        raise ValueError(f"gather_rows: an fp8_e4m3 row holds 33 bytes per 32 values, not {raw_row_elems} bytes")
    return raw_row_elems // (FP8_BLOCK + 1) * FP8_BLOCK


def decode_fp8(raw: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8_e4m3 raw rows [n, head_dim + head_dim / 32] (uint8) -> [n, head_dim] in out_dtype, on
    raw's device: the torch path's decode, and the one for rows copied raw through staging."""
    n, elems = raw.shape
    head_dim = head_dim_of("fp8_e4m3", elems)
    values = raw.narrow(1, 0, head_dim).contiguous().view(torch.float8_e4m3fn).to(torch.float32)
    scale_bits = raw.narrow(1, head_dim, head_dim // FP8_BLOCK).to(torch.int32) << 23
    scale = torch.where(scale_bits == 0, _UE8M0_ZERO_BITS, scale_bits).view(torch.float32)
    return (values.view(n, -1, FP8_BLOCK) * scale.unsqueeze(-1)).view(n, head_dim).to(out_dtype)


@torch.library.custom_op("engram::gather_rows", mutates_args=())
def gather_rows(table: torch.Tensor, rows: torch.Tensor, table_dtype: str,
                out_dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """table[rows] decoded, [n, head_dim] in out_dtype (float32 or bfloat16), new memory.
    table: raw rows [num_rows, raw_row_elems] of table_dtype (bfloat16 as stored, fp8 as
    uint8), a CUDA tensor, a UVA view or a CPU tensor; rows: int64 ids [n] on table's device,
    inside the table (an id outside it is not checked: that would sync the host).
    backend: "auto" (choose_backend), "triton" or "torch"."""
    head_dim = _check(table, rows, table_dtype, out_dtype)
    chosen = choose_backend(table.device) if backend == "auto" else backend
    if chosen == "torch":
        raw = table.index_select(0, rows)
        return decode_fp8(raw, out_dtype) if table_dtype == "fp8_e4m3" else raw.to(out_dtype)
    if chosen != "triton" or choose_backend(table.device) != "triton":
        raise ValueError(f"gather_rows: backend {backend!r} cannot run on {table.device} here "
                         f"(triton {'missing' if triton is None else 'present'}; CPU tensors need "
                         "triton_backend.interpreted())")
    return _gather_triton(table, rows, table_dtype, out_dtype, head_dim)


@gather_rows.register_fake
def _gather_rows_fake(table, rows, table_dtype, out_dtype=torch.float32, backend="auto"):
    head_dim = _check(table, rows, table_dtype, out_dtype)
    return table.new_empty((rows.shape[0], head_dim), dtype=out_dtype)


def _check(table: torch.Tensor, rows: torch.Tensor, table_dtype: str, out_dtype: torch.dtype) -> int:
    """Validates what can be checked without reading data; returns head_dim."""
    if table.dim() != 2 or rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError(f"gather_rows: needs a 2-D table and 1-D int64 rows, got {tuple(table.shape)} "
                         f"and {tuple(rows.shape)} {rows.dtype}")
    if table.stride(1) != 1:
        raise ValueError(f"gather_rows: a table row must be contiguous, got strides {table.stride()}")
    if table.device != rows.device:
        raise ValueError(f"gather_rows: table on {table.device} but rows on {rows.device}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"gather_rows: out_dtype must be float32 or bfloat16, got {out_dtype}")
    return head_dim_of(table_dtype, table.shape[1])


def _gather_triton(table: torch.Tensor, rows: torch.Tensor, table_dtype: str, out_dtype: torch.dtype,
                   head_dim: int) -> torch.Tensor:
    out = torch.empty((rows.shape[0], head_dim), dtype=out_dtype, device=table.device)
    if rows.shape[0] == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    block_n = max(1, _TILE // block_d)
    raw = table.view(torch.int16) if table_dtype == "bfloat16" else table  # bits, converted in the kernel
    kernel = _kernel(triton.knobs.runtime.interpret)
    kernel[(triton.cdiv(rows.shape[0], block_n),)](
        raw, rows, out.view(torch.int16) if out_dtype == torch.bfloat16 else out, rows.shape[0], table.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, KIND=_KIND[table_dtype],
        OUT_BF16=out_dtype == torch.bfloat16)
    return out


@functools.cache
def _kernel(interpret: bool):
    """The kernel, jitted once per mode: triton picks interpreter or compiler at decoration time."""
    return triton.jit(_gather_kernel)


def _gather_kernel(table_ptr, rows_ptr, out_ptr, n_rows, row_stride, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, KIND: tl.constexpr, OUT_BF16: tl.constexpr):
    """BLOCK_N requested rows per program, each read once and written decoded (KIND: 0 float32,
    1 bfloat16 bits as int16, 2 fp8_e4m3 bytes; OUT_BF16: out holds bfloat16 bits as int16)."""
    idx = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    valid = idx < n_rows
    mask = valid[:, None] & (cols < HEAD_DIM)[None, :]
    rows = tl.load(rows_ptr + idx, mask=valid, other=0)
    start = table_ptr + rows[:, None] * row_stride
    raw = tl.load(start + cols[None, :], mask=mask, other=0)
    if KIND == 0:
        value = raw
    elif KIND == 1:
        value = (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)
    else:  # e4m3: sign, 4 exponent bits (bias 7, 0 = subnormal), 3 mantissa bits; S.1111.111 is NaN
        b = raw.to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        subnormal = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2**-9
        bits = tl.where(e == 0, subnormal, ((e + 120) << 23) | (m << 20))
        bits = tl.where((e == 15) & (m == 7), 0x7FC00000, bits) | ((b & 128) << 24)
        scale = tl.load(start + HEAD_DIM + cols[None, :] // 32, mask=mask, other=127).to(tl.int32)
        scale_bits = tl.where(scale == 0, 0x00400000, scale << 23)  # _UE8M0_ZERO_BITS for byte 0
        value = bits.to(tl.float32, bitcast=True) * scale_bits.to(tl.float32, bitcast=True)
    dst = out_ptr + idx[:, None].to(tl.int64) * HEAD_DIM + cols[None, :]
    if not OUT_BF16:
        tl.store(dst, value, mask=mask)
    elif KIND == 1:
        tl.store(dst, raw, mask=mask)
    else:  # round to nearest even on the bits; NaN stays a quiet NaN
        bits32 = value.to(tl.uint32, bitcast=True)
        rounded = (bits32 + 0x7FFF + ((bits32 >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)
        tl.store(dst, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
