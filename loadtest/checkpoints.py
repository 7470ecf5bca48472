"""Engram checkpoints for ``compare``: given, or created once and cached by size.

Table size is the knob of the overhead question (the lookup is O(1), so the
cost should not grow with the table), hence ``--table-gb``: it is turned into an
``engram_vocab_size`` for the default SmolLM2 layout (2 Engram layers, N-gram
orders 2 and 3, 8 heads per order, 64-dim rows), since a table holds one row per
hash bucket and ``engram_vocab_size`` buckets per head (primes just above it).
Checkpoints are made with the project's own commands (``engram-init``, and
``engram-convert`` for fp8) as subprocesses; nothing of the server is imported.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_LAYOUT = {"layers": 2, "orders": 2, "heads": 8, "head_dim": 64}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def vocab_for_table_gb(table_gb: float, dtype: str = "bfloat16", layout: dict = DEFAULT_LAYOUT) -> int:
    """engram_vocab_size whose tables (all layers together) take ``table_gb`` * 1e9 bytes."""
    if table_gb <= 0:
        raise ValueError(f"--table-gb must be > 0, got {table_gb}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"tables are created as {sorted(DTYPE_BYTES)}, not {dtype!r}")
    row_bytes = layout["head_dim"] * DTYPE_BYTES[dtype]
    rows_per_vocab = layout["layers"] * layout["orders"] * layout["heads"]
    return max(1, int(table_gb * 1e9 / (row_bytes * rows_per_vocab)))


def _command(script: str, module: str) -> list[str]:
    exe = shutil.which(script)
    return [exe] if exe else [sys.executable, "-c", f"import sys; from {module} import "
                              f"{'init_main' if script == 'engram-init' else 'main'} as m; sys.exit(m())"]


def _run(cmd: list[str], what: str) -> None:
    print("$ " + " ".join(cmd))
    done = subprocess.run(cmd)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}")


def create_checkpoint(root: Path, vocab_size: int, dtype: str) -> Path:
    """``engram-init`` into ``root``/v<vocab>-<dtype>, skipped when already there."""
    out = root / f"v{vocab_size}-{dtype}"
    if (out / "engram.json").is_file():
        return out
    _run(_command("engram-init", "engram_runtime.checkpoint")
         + ["--out", str(out), "--engram-vocab-size", str(vocab_size), "--dtype", dtype],
         "engram-init")
    return out


def create_fp8(src: Path) -> Path:
    """An fp8 copy of checkpoint ``src`` next to it (``engram-convert --dtype fp8``)."""
    out = src.with_name(src.name + "-fp8")
    if (out / "engram.json").is_file():
        return out
    _run(_command("engram-convert", "offload.convert")
         + [str(src), "--out", str(out), "--dtype", "fp8"], "engram-convert")
    return out


def resolve_checkpoints(args: argparse.Namespace, needed: str) -> dict[str, str]:
    """Values for the {engram} / {engram_fp8} placeholders that ``needed`` mentions."""
    fill: dict[str, str] = {}
    if "{engram" not in needed:
        return fill
    if args.engram:
        src = Path(args.engram)
        if not (src / "engram.json").is_file():
            raise ValueError(f"--engram {src}: no engram.json there")
    else:
        if args.engram_vocab_size is None and args.table_gb is None:
            raise ValueError("these variants need a table: pass --engram DIR, "
                             "--engram-vocab-size N or --table-gb G")
        vocab = args.engram_vocab_size or vocab_for_table_gb(args.table_gb, args.table_dtype)
        root = Path(args.ckpt_dir or Path.home() / ".cache" / "engram-serve" / "loadtest")
        src = create_checkpoint(root, vocab, args.table_dtype)
    fill["engram"] = str(src)
    if "{engram_fp8}" in needed:
        fill["engram_fp8"] = args.engram_fp8 or str(create_fp8(src))
    return fill
