"""``engram-convert``: rewrite a checkpoint's Engram table(s) in another dtype and report the error.

    engram-convert CKPT_DIR --dtype fp8 [--layers 1 15] [--keep-old]

Each table is streamed (bounded memory) from the old file into ``table_layer{L}.{dtype}.safetensors``;
the quantisation error against the source values (max |error| and relative RMS =
||q - x|| / ||x||) is accumulated while writing. Only after the new file is complete is
``engram.json`` rewritten (atomically, other fields untouched), and only then is the old file
removed: a crash at any point leaves a checkpoint that loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from offload.dtypes import table_dtype
from offload.tablefile import TableFileError, TableHeader, check_table, map_rows, read_header, write_table

MANIFEST = "engram.json"


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


def _write_manifest(ckpt_dir: Path, manifest: dict) -> None:
    tmp = ckpt_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, ckpt_dir / MANIFEST)


def convert_checkpoint(ckpt_dir, dtype: str, layers: list[int] | None = None, keep_old: bool = False,
                       progress: bool = True) -> list[ConversionReport]:
    """Convert the tables of an Engram checkpoint directory in place (see module docstring)."""
    ckpt_dir = Path(ckpt_dir)
    manifest_path = ckpt_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        tables = manifest["tables"]
    except FileNotFoundError:
        raise TableFileError(f"{manifest_path} does not exist (not an Engram checkpoint directory?)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TableFileError(f"{manifest_path} is not a valid Engram manifest: {exc}") from None
    target = table_dtype(dtype)
    wanted = [str(layer) for layer in layers] if layers else sorted(tables, key=int)
    unknown = [layer for layer in wanted if layer not in tables]
    if unknown:
        raise ValueError(f"{manifest_path} has no tables for layers {unknown}; it has {sorted(tables, key=int)}")
    reports = []
    for layer in wanted:
        entry = tables[layer]
        src = ckpt_dir / entry["file"]
        check_table(src, entry)
        if table_dtype(entry["dtype"]).name == target.name:
            continue
        dst = ckpt_dir / f"table_layer{layer}.{target.name}.safetensors"
        new_entry, report = convert_table(src, dst, target.name, int(layer), progress)
        tables[layer] = {**entry, **new_entry}
        _write_manifest(ckpt_dir, manifest)
        if not keep_old and src.resolve() != dst.resolve():
            src.unlink()
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="engram-convert",
                                     description="Rewrite an Engram checkpoint's tables in another dtype "
                                                 "and report the quantisation error.")
    parser.add_argument("ckpt_dir", help="Engram checkpoint directory (holds engram.json)")
    parser.add_argument("--dtype", required=True, help="float32 | bfloat16 | fp8_e4m3 (aliases: fp32, bf16, fp8)")
    parser.add_argument("--layers", type=int, nargs="*", help="only these layer ids (default: all tables)")
    parser.add_argument("--keep-old", action="store_true", help="keep the old table files")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        reports = convert_checkpoint(args.ckpt_dir, args.dtype, args.layers, args.keep_old, not args.quiet)
    except (TableFileError, ValueError, OSError) as exc:
        print(f"engram-convert: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([asdict(r) for r in reports], indent=2))
    elif not reports:
        print(f"nothing to convert: every selected table is already {table_dtype(args.dtype).name}")
    for r in [] if args.json else reports:
        print(f"layer {r.layer_id}: {r.src_dtype} -> {r.dst_dtype} {r.file} "
              f"({r.src_nbytes / 1e6:.1f} MB -> {r.dst_nbytes / 1e6:.1f} MB), "
              f"max abs error {r.max_abs_error:.3g}, relative RMS error {r.relative_rms_error:.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
