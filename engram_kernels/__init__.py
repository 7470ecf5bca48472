"""Fused CPU kernels for the decode hot path, each beside the torch ops it replaces.

A decode step on a small CPU is dozens of small torch ops per layer whose fixed costs and
extra passes over memory add up to a large share of the step: the kernels in csrc/ do each
job in one pass: decode attention with RoPE and the KV-cache write, RMSNorm (with the
residual add before it) straight into the next matmul's dtype, SiLU-and-multiply, an Engram
layer's gate and short conv for a decode step, the N-gram hash of every layer, a table's
gather-and-decode, the projection of a decode step's rows, and a decode step's matmul with a
weight held in llama.cpp's quantised blocks (block_linear; block_linear_bf16 with bfloat16
dot products for a few rows in bfloat16). Engram's calls run mid-forward with caches the
backbone's weights have just flushed, where a native call costs a fraction of the torch ops it
replaces. The module also holds the native prefetch worker,
``native().RowPrefetcher`` (csrc/row_prefetch.cpp, made by ``row_prefetcher``), a thread
that hashes, gathers and projects a decode step's rows without the GIL, and the counters it
keeps for the table statistics (``native().TableCounters``). Structures cross into C++ as
the named dataclasses below (MixWeights, HashArgs, LayerJob).

They are compiled on first use (~45 s, once per machine and checkout, cached in
torch's extension directory, shared by later processes) by torch's C++ extension
builder with the system compiler. Without a compiler, with ENGRAM_SERVE_NATIVE=0,
where autograd is recording (training: the kernels have no backward), or for tensors
that are not on the CPU, every function here runs its torch (or numpy) equivalent
instead; the tests check that the two agree. The native functions themselves refuse
tensors that are not on the CPU.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in (
    "decode_attention.cpp", "elementwise.cpp", "engram_mix.cpp", "ngram_hash.cpp", "gather_rows.cpp", "small_linear.cpp",
    "block_linear.cpp", "row_prefetch.cpp", "table_counters.cpp", "module.cpp")]
# Projections of up to this many rows (decode steps) use small_linear wherever they run, on the
# native prefetch worker and in the Python paths alike, so both give the same bits: up to here it
# runs on one thread, which is all the worker has, at a cost oneDNN's matmul matches only beyond.
SMALL_LINEAR_MAX_ROWS = 64
# -ffast-math lets gcc vectorise expf (softmax, SiLU); inputs are finite activations
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


def build_name() -> str:
    """The build's name in torch's extension cache, keyed by this CPU's feature flags
    (-march=native: a home directory shared between machines must not hand one CPU a
    binary built for another) and by every source and header (torch does not know about
    headers, and two checkouts of different sources under one name rebuild each other)."""
    key = hashlib.sha1(_cpu_flags().encode())
    for source in sorted(CSRC.glob("*.[ch]*")):
        key.update(source.read_bytes())
    return f"engram_serve_native_{key.hexdigest()[:12]}"


def _cpu_flags() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():  # not Linux
        return platform.processor()
    return next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (avx2, fma, avx512f, ...); empty off Linux."""
    line = _cpu_flags()
    return set(line.split(":", 1)[1].split()) if line.startswith("flags") else set()


@functools.cache
def native() -> ModuleType | None:
    """The compiled kernels (built on first use, or loaded from torch's extension cache);
    None if they cannot be used."""
    if os.environ.get("ENGRAM_SERVE_NATIVE", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        log.info("loading native kernels (the first build on a machine takes ~45 s)")
        return load(build_name(), [str(s) for s in SOURCES], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, failed build: the torch path still works
        log.warning("native kernels unavailable, using torch ops instead: %s", e)
        return None


def available() -> bool:
    """Whether the kernels are built (building them on the first call)."""
    return native() is not None


class _Portable(threading.local):
    on = False  # inside disabled(), in this thread


_portable = _Portable()


@contextlib.contextmanager
def disabled():
    """Torch ops only in this thread while inside: the GPU's code path, run on CPU tensors."""
    before, _portable.on = _portable.on, True
    try:
        yield
    finally:
        _portable.on = before


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether this call may use the kernels: they are built, not disabled() here, autograd is
    not recording and every tensor given is on the CPU (CUDA tensors, and fake ones, take the
    torch ops). Called a hundred times a decode step: a loop, not a generator."""
    if _portable.on or torch.is_grad_enabled() or native() is None:
        return False
    for t in tensors:
        if not t.is_cpu:
            return False
    return True


@dataclass(frozen=True)
class MixWeights:
    """An Engram layer's own weights for engram_mix, in their final forms (EngramLayer.mix_weights):
    key_scale [hc, D] (both gate norms' weights and 1/sqrt(D)), the conv's branch norm weights
    [hc, D] and taps [kernel_size, hc*D], all float32 and contiguous; the conv's dilation; the
    gate's and the conv norm's epsilons."""

    key_scale: torch.Tensor
    norm_weight: torch.Tensor
    taps: torch.Tensor
    dilation: int
    gate_eps: float
    conv_eps: float


@dataclass(frozen=True)
class HashArgs:
    """NgramHasher.step_rows as data for the native worker (NgramHasher.kernel_args): ngram_rows'
    arguments after the token ids (lookup, pad, multipliers, primes, offsets: layers in the
    worker's order, offsets included), then the raw pad id of a window's missing positions and
    N - 1, the context positions before each row's new tokens."""

    lookup: torch.Tensor
    pad: int
    multipliers: torch.Tensor
    primes: torch.Tensor
    offsets: torch.Tensor
    window_pad: int
    skip: int


@dataclass(frozen=True)
class LayerJob:
    """What the native worker does with one layer's rows (csrc/row_prefetch.h): gather them from
    `table` (raw rows in CPU memory) decoded into `dtype`, project each token's rows (flattened)
    @ weight.T + bias in float32 and view the result as `shape`. With `mix`, a ticket's mix() runs
    engram_mix on it with the layer's conv state `conv_state` (updated in place)."""

    table: torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    conv_state: torch.Tensor | None = None
    mix: MixWeights | None = None


def row_prefetcher(jobs: list[LayerJob], hash_args: HashArgs, counters):
    """The native prefetch worker over these layers (in the forward's order, which hash_args
    follows): `submit_tokens(contexts, new token counts, slots)` hashes a step's tokens, gathers
    and projects each layer's rows, and returns its ticket at once; counters: the native
    TableCounters its gathers and waits go to."""
    return native().RowPrefetcher(jobs, hash_args, counters)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE + KV-cache write + attention for one new token per row (native only: the
    torch path builds AttentionInputs instead, see ModelRunner.attention_inputs).
    qkv [R, H + 2 KV, D] before RoPE, in the caches' dtype; cos/sin [R, D] float32
    -> [R, H, D] in the caches' dtype."""
    return native().decode_attention(qkv, cos, sin, k_cache, v_cache, slots, positions)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm of float32 x with float32 weight, returned in `dtype` (the next matmul's)."""
    if enabled(x) and x.is_contiguous():
        return native().rms_norm(x, weight, eps, dtype)
    return F.rms_norm(x, weight.shape, weight, eps).to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta)). The native kernel adds in place, so the caller
    must not use x afterwards, only the returned sum."""
    if enabled(x, delta) and x.is_contiguous() and delta.is_contiguous():
        return x, native().add_rms_norm_(x, delta, weight, eps, dtype)
    x = x + delta
    return x, rms_norm(x, weight, eps, dtype)


def silu_and_mul(gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dimension, in `dtype`."""
    if enabled(gate_up) and gate_up.is_contiguous():
        return native().silu_and_mul(gate_up, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    return (F.silu(gate) * up).to(dtype)


def engram_mix(hidden: torch.Tensor, memory: torch.Tensor, state: torch.Tensor, slots: torch.Tensor,
               weights: MixWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """EngramLayer.mix for one new token per row (native only, see csrc/engram_mix.cpp), all
    float32 and contiguous: hidden [B, hc, D], memory [B, hc + 1, D] -> (out [B, hc, D], gate
    [B, hc]); rows `slots` of the conv state [slots, context, hc * D] advance by one position."""
    return native().engram_mix(hidden, memory, state, slots, weights)


def ngram_rows(ids: torch.Tensor, lookup: torch.Tensor, pad: int, multipliers: torch.Tensor, primes: torch.Tensor,
               offsets: torch.Tensor, skip: int) -> torch.Tensor:
    """NgramHasher's row ids (native only; engram_runtime/hashing.py has the numpy path), all
    int64: raw ids [B, W] -> [L, B, W - skip, (N - 1) * H], plus each head's `offsets` [L, (N-1)*H];
    lookup [V] compresses ids, pad is the compressed id before the sequence start,
    multipliers [L, N], primes [L, N - 1, H]. The first `skip` positions are context only."""
    return native().ngram_rows(ids, lookup, pad, multipliers, primes, offsets, skip)


def gather_rows(table: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[rows] decoded into `dtype` (float32 or bfloat16), new memory (native only;
    offload/dtypes.py has the torch path). table: raw rows, float32, bfloat16 or fp8_e4m3
    bytes; rows: int64 ids. Raises IndexError for an id outside the table."""
    return native().gather_rows(table, rows, dtype)


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight [O, K].T + bias, float32 out, for a few rows (native only; see
    csrc/small_linear.cpp). x, weight and bias float32 or bfloat16."""
    return native().small_linear(x, weight, bias)


def block_linear(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                 bits: int) -> torch.Tensor:
    """x [M, K] @ W.T, float32 out, for a weight W [N, K] in 32-value blocks of `bits` (4 or 8) bits
    (native only; engram_runtime/quantization.py has the blocks and their torch dequantisation)."""
    return native().block_linear(x, qs, scales, mins, bits)


def block_linear_bf16(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                      bits: int) -> torch.Tensor:
    """block_linear with the dense bfloat16 copy's arithmetic (the weight's values and x rounded to
    bfloat16, float32 sums) in AVX-512 BF16 dot products: native, where block_linear_bf16_fast()."""
    return native().block_linear_bf16(x, qs, scales, mins, bits)


def block_linear_bf16_fast() -> bool:
    """Whether block_linear_bf16 was built (a CPU with AVX-512 BF16)."""
    return native() is not None and native().block_linear_bf16_built()


def block_linear_fast() -> bool:
    """Whether block_linear was built with AVX-512 or AVX2, where it beats oneDNN's dense matmul
    for decode steps; its plain-loop build elsewhere is correct but slower (docs/performance.md)."""
    return native() is not None and native().block_linear_isa() in ("avx512", "avx2")
