"""Engram checkpoints for ``compare``: given, or created once and cached by size.

Table size is the knob of the overhead question (the lookup is O(1), so the
cost should not grow with the table), hence ``--table-gb``: it is turned into an
``engram_vocab_size`` for the default SmolLM2 layout (2 Engram layers, N-gram
orders 2 and 3, 8 heads per order, 64-dim rows), since a table holds one row per
hash bucket and ``engram_vocab_size`` buckets per head (primes just above it).
Checkpoints are made with the project's own commands (``engram-init``, and
``--dtype fp8_e4m3`` for the fp8 variant) as a subprocess: the load tester imports
none of the packages it measures.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from loadtest.process import repo_env

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


def engram_init_cmd(args: list[str]) -> list[str]:
    """This checkout's ``engram-init``, whether or not it is pip-installed (as engram_serve_cmd)."""
    return [sys.executable, "-m", "engram_runtime.checkpoint_init", *args]


def create_checkpoint(root: Path, vocab_size: int, dtype: str) -> Path:
    """``engram-init`` into ``root``/v<vocab>-<dtype>, skipped when already there.

    Same seed and layout for every dtype, so an fp8 checkpoint is the bf16 one quantised."""
    out = root / f"v{vocab_size}-{dtype}"
    if (out / "engram.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    cmd = engram_init_cmd([str(out), "--rows-per-head", str(vocab_size), "--dtype", dtype, "--force"])
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=repo_env())
    if done.returncode != 0:
        raise RuntimeError(f"engram-init failed (exit {done.returncode}): {' '.join(cmd)}")
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
        if args.engram_fp8:
            fill["engram_fp8"] = args.engram_fp8
        elif args.engram:
            raise ValueError("the fp8 variant needs --engram-fp8 DIR when --engram is given "
                             "(or give --engram-vocab-size / --table-gb to create both)")
        else:
            fill["engram_fp8"] = str(create_checkpoint(src.parent, vocab, "fp8_e4m3"))
    return fill
