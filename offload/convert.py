"""Rewrite one table file in another dtype, measuring the quantisation error on the way.

The table is streamed (bounded memory) from the old file into the new one; the error against the
source values (max |error| and relative RMS = ||q - x|| / ||x||) is accumulated while writing.
Naming the new file and updating the checkpoint's manifest is the caller's (``engram-convert``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.dtypes import table_dtype
from offload.tablefile import TableHeader, map_rows, read_header, write_table


@dataclass
class ConversionReport:
    """Quantisation error of one converted table, relative to the source table's values."""

    layer_id: int
    src_dtype: str
    dst_dtype: str
    file: str
    src_nbytes: int
    dst_nbytes: int
    max_abs_error: float
    relative_rms_error: float


class _ErrorMeter:
    """Streams max |q - x| and sum of squares of error and reference over chunks."""

    def __init__(self) -> None:
        self.max_abs, self.err_sq, self.ref_sq = 0.0, 0.0, 0.0

    def add(self, reference: torch.Tensor, approx: torch.Tensor) -> None:
        err = (approx - reference).double()
        self.max_abs = max(self.max_abs, float(err.abs().max()) if err.numel() else 0.0)
        self.err_sq += float((err * err).sum())
        self.ref_sq += float((reference.double() ** 2).sum())

    @property
    def relative_rms(self) -> float:
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0


def read_values(header: TableHeader, rows: np.ndarray, start: int, end: int) -> torch.Tensor:
    """float32 values of rows [start, end) of a mapped table file."""
    raw = torch.from_numpy(np.array(rows[start:end])).view(header.dtype.torch_raw)
    return header.dtype.decode(raw, torch.float32)


def convert_table(src: Path, dst: Path, dtype: str, layer_id: int, progress: bool = True) -> tuple[dict, ConversionReport]:
    """Write `src`'s table as `dtype` to `dst`; return (manifest entry, error report)."""
    header = read_header(src)
    target = table_dtype(dtype)
    rows = map_rows(header)
    meter = _ErrorMeter()

    def fill(start: int, end: int) -> torch.Tensor:
        values = read_values(header, rows, start, end)
        meter.add(values, target.decode(target.encode(values), torch.float32))
        return values

    entry = write_table(dst, header.num_rows, header.head_dim, target.name, fill, progress=progress)
    report = ConversionReport(layer_id, header.dtype.name, target.name, dst.name, header.file_nbytes,
                              entry["nbytes"], meter.max_abs, meter.relative_rms)
    return entry, report
