"""``engram-convert``: rewrite a checkpoint's Engram table(s) in another dtype and report the error.

    engram-convert CKPT_DIR --dtype fp8 [--layers 1 15] [--keep-old]

Each table is streamed (bounded memory, offload.convert) from the old file into
``table_layer{L}.{dtype}.safetensors``. Only after the new file is complete is ``engram.json``
rewritten (atomically, other fields untouched), and only then is the old file removed: a crash
at any point leaves a checkpoint that loads.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from offload.convert import ConversionReport, convert_table
from offload.dtypes import table_dtype
from offload.tablefile import TableFileError, check_table

from .checkpoint_format import EngramCheckpointError, read_manifest, table_file_name, with_files, write_manifest


def convert_checkpoint(ckpt_dir, dtype: str, layers: list[int] | None = None, keep_old: bool = False,
                       progress: bool = True) -> list[ConversionReport]:
    """Convert the tables of an Engram checkpoint directory in place (see module docstring)."""
    ckpt_dir = Path(ckpt_dir)
    manifest, cfg = read_manifest(ckpt_dir)
    target = table_dtype(dtype)
    wanted = list(layers) if layers else cfg.layer_ids
    unknown = [str(layer) for layer in wanted if layer not in cfg.layer_ids]
    if unknown:
        raise ValueError(f"{ckpt_dir} has no tables for layers {unknown}; it has {cfg.layer_ids}")
    reports = []
    for layer in wanted:
        entry = manifest["tables"][str(layer)]
        src = ckpt_dir / entry["file"]
        check_table(src, entry)
        if table_dtype(entry["dtype"]).name == target.name:
            continue
        dst = ckpt_dir / table_file_name(layer, target.name)
        new_entry, report = convert_table(src, dst, target.name, layer, progress)
        manifest = with_files(manifest, tables={layer: new_entry})
        write_manifest(ckpt_dir, manifest)
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
    except (EngramCheckpointError, TableFileError, ValueError, OSError) as exc:
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
