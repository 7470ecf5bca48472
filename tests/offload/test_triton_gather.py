"""The Triton row gather (engram_kernels/triton_gather.py) equals the tables' torch decode bit for bit.

The kernel runs here in Triton's CPU interpreter (triton_backend.interpreted() for this module's
tests only: the kernel is jitted lazily under the current setting), over every table dtype and
output dtype, random rows with repeats and row counts that are not a multiple of a program's
block; its torch fallback and the custom op's fake (FakeTensorMode on "cuda") are checked too.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from engram_kernels import triton_backend
from engram_kernels.triton_backend import choose_backend, interpreted
from engram_kernels.triton_gather import decode_fp8, gather_rows
from offload.dtypes import table_dtype

requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
DTYPES = ["float32", "bfloat16", "fp8_e4m3"]
OUTS = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def interpreter():
    with interpreted():
        yield


def make_table(name: str, num_rows: int, head_dim: int, seed: int = 0) -> torch.Tensor:
    """Raw rows as the table files hold them: values over a wide range of magnitudes, encoded."""
    gen = torch.Generator().manual_seed(seed)
    magnitudes = torch.exp2(torch.randint(-30, 30, (num_rows, 1), generator=gen).float())
    return table_dtype(name).encode(torch.randn(num_rows, head_dim, generator=gen) * magnitudes)


def reference(table: torch.Tensor, rows: torch.Tensor, name: str, out: torch.dtype) -> torch.Tensor:
    return table_dtype(name).decode(table.index_select(0, rows), out)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@requires_triton
@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("head_dim, n", [(64, 37), (96, 1), (256, 130)])
def test_triton_kernel_equals_the_torch_decode(name, out, head_dim, n):
    table = make_table(name, 203, head_dim)
    rows = torch.randint(0, 203, (n,), generator=torch.Generator().manual_seed(n))
    rows = torch.cat([rows, rows.flip(0)])  # every row twice
    assert choose_backend(table.device) == "triton"
    assert_same(gather_rows(table, rows, name, out, backend="triton"), reference(table, rows, name, out))
    assert_same(gather_rows(table, rows, name, out, backend="torch"), reference(table, rows, name, out))


@requires_triton
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("out", OUTS)
def test_every_fp8_byte_and_scale(out):
    """All 256 e4m3 codes (zeros, subnormals, NaN) under scales 2**-127 .. 2**127: the bit-level
    decode must equal torch's casts. (Byte 255, 2**128, is past float32 and past what the encoder
    writes; there offload's numpy decode, an ldexp, and its torch decode, times inf, disagree.)"""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    scales = torch.arange(255, dtype=torch.int32).to(torch.uint8).view(255, 1)
    table = torch.cat([codes.repeat(255, 1), scales.repeat(1, 8)], dim=1)  # [255, 256 + 8]
    rows = torch.arange(255).flip(0)
    assert_same(gather_rows(table, rows, "fp8_e4m3", out, backend="triton"), reference(table, rows, "fp8_e4m3", out))
    assert_same(decode_fp8(table, out), reference(table, torch.arange(255), "fp8_e4m3", out))


@requires_triton
def test_float32_to_bfloat16_rounds_to_nearest_even():
    """Ties, carries into the exponent, overflow to infinity, subnormals, NaNs: torch's rounding."""
    special = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, 2 - 2**-9, 3.3895314e38, 1e-39, -2.5e-39, float("nan"),
                            float("inf"), -float("inf"), -0.0], dtype=torch.float32)
    payload_nan = torch.tensor([0x7F800001, -0x7FFFFFFF], dtype=torch.int32).view(torch.float32)  # low bits only
    values = torch.cat([special, payload_nan, torch.randn(244) * torch.exp2(torch.randint(-140, 120, (244,)).float())])
    table = values.view(64, 4)
    rows = torch.arange(64)
    assert_same(gather_rows(table, rows, "float32", torch.bfloat16, backend="triton"), table.to(torch.bfloat16))


@requires_triton
def test_no_rows_and_the_backend_choice(monkeypatch):
    table = make_table("bfloat16", 5, 32)
    assert gather_rows(table, torch.empty(0, dtype=torch.int64), "bfloat16", backend="triton").shape == (0, 32)
    assert choose_backend(torch.device("cuda")) == "triton"
    monkeypatch.setattr(triton_backend, "_on_cpu", False)
    assert choose_backend(torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match=r"interpreted\(\)"):
        gather_rows(table, torch.tensor([1]), "bfloat16", backend="triton")
    rows = torch.tensor([1, 4])
    assert_same(gather_rows(table, rows, "bfloat16"), reference(table, rows, "bfloat16", torch.float32))  # auto: torch


def test_torch_fallback_without_triton(monkeypatch):
    monkeypatch.setattr(triton_backend, "triton", None)
    table, rows = make_table("fp8_e4m3", 50, 64), torch.tensor([3, 3, 49, 0])
    assert choose_backend(table.device) == "torch"
    want = reference(table, rows, "fp8_e4m3", torch.bfloat16)
    assert_same(gather_rows(table, rows, "fp8_e4m3", torch.bfloat16), want)


def test_bad_arguments_are_refused():
    table = make_table("float32", 10, 32)
    for args, match in [((table, torch.tensor([1]), "int8"), "unknown table dtype"),
                        ((table, torch.tensor([[1]]), "float32"), "1-D int64"),
                        ((table, torch.tensor([1], dtype=torch.int32), "float32"), "1-D int64"),
                        ((table.to(torch.uint8), torch.tensor([1]), "fp8_e4m3"), "33 bytes per 32"),
                        ((table.t(), torch.tensor([1]), "float32"), "contiguous")]:
        with pytest.raises(ValueError, match=match):
            gather_rows(*args)
    with pytest.raises(ValueError, match="out_dtype"):
        gather_rows(table, torch.tensor([1]), "float32", torch.float16)


@pytest.mark.parametrize("name", DTYPES)
def test_traces_under_fake_cuda(name):
    """The custom op's fake gives the shape on the fake device and refuses rows on another one."""
    elems = {"float32": 128, "bfloat16": 128, "fp8_e4m3": 132}[name]
    raw = table_dtype(name).torch_raw
    with FakeTensorMode():
        table = torch.empty(1000, elems, dtype=raw, device="cuda")
        out = gather_rows(table, torch.empty(48, dtype=torch.int64, device="cuda"), name, torch.bfloat16)
        assert out.device.type == "cuda" and out.shape == (48, 128) and out.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="rows on cpu"):
            gather_rows(table, torch.empty(48, dtype=torch.int64), name)
