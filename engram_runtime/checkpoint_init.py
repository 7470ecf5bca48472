"""``engram-init``: create an Engram checkpoint for a backbone.

    engram-init OUT [--model GGUF|HF_DIR] [--rows-per-head N | --table-gb G] [--dtype bfloat16]

``engram_init(InitOptions(...))`` is the command as a function: the server calls it to create
its default checkpoint, the command line only parses flags into the options. The layout's
defaults are default_config's, so the command, the server and the tests make the same one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from offload.dtypes import table_dtype
from offload.tablefile import TableFileError

from .checkpoint import DEFAULT_ROWS_PER_VOCAB, backbone_info, default_config, init_checkpoint, rows_per_head_for_size
from .checkpoint_format import EngramCheckpointError
from .engram_config import EngramConfig
from .hashing import table_sizes_for

_DEFAULT = default_config(vocab_size=1)
# What engram_init raises for bad options, a full disk or an existing directory (never a bug).
INIT_ERRORS = (EngramCheckpointError, TableFileError, ValueError, OSError)


@dataclass
class InitOptions:
    """engram-init's flags, with the command's defaults."""

    out: Path                                 # checkpoint directory to create
    model: str | None = None                  # GGUF file or HF model dir; None: the default backbone
    rows_per_head: int | None = None          # engram_vocab_size of every order; None: 5 x backbone vocab
    table_gb: float | None = None             # instead: each layer's table file takes this many GB
    dtype: str = "bfloat16"
    layers: list[int] = field(default_factory=lambda: list(_DEFAULT.layer_ids))
    max_ngram_size: int = _DEFAULT.max_ngram_size
    heads_per_ngram: int = _DEFAULT.n_head_per_ngram
    head_dim: int = _DEFAULT.head_dim
    kernel_size: int = _DEFAULT.kernel_size
    pad_id: int = _DEFAULT.pad_id
    seed: int = _DEFAULT.seed
    force: bool = False                       # replace an existing directory
    progress: bool = True

    def config(self, backbone: dict) -> EngramConfig:
        """The EngramConfig these options give for `backbone`; ValueError if it cannot fit it."""
        if self.rows_per_head is not None and self.table_gb is not None:
            raise ValueError("give rows per head or a table size, not both")
        rows = self.rows_per_head
        if self.table_gb is not None:
            if self.table_gb <= 0:
                raise ValueError(f"--table-gb must be positive, got {self.table_gb}")
            heads_total = (self.max_ngram_size - 1) * self.heads_per_ngram
            rows = rows_per_head_for_size(self.table_gb, heads_total, self.head_dim, self.dtype)
        rows = rows or DEFAULT_ROWS_PER_VOCAB * backbone["vocab_size"]
        cfg = EngramConfig(engram_vocab_size=[rows] * (self.max_ngram_size - 1), max_ngram_size=self.max_ngram_size,
                           n_embed_per_ngram=self.head_dim * self.heads_per_ngram,
                           n_head_per_ngram=self.heads_per_ngram, layer_ids=list(self.layers), pad_id=self.pad_id,
                           seed=self.seed, kernel_size=self.kernel_size, hc_mult=1)
        if max(cfg.layer_ids) >= backbone["num_hidden_layers"] or cfg.pad_id >= backbone["vocab_size"]:
            raise ValueError(f"layers {cfg.layer_ids} / pad id {cfg.pad_id} do not fit backbone {backbone}")
        return cfg


def engram_init(options: InitOptions) -> dict:
    """Create the checkpoint the options describe; return its manifest. Raises one of INIT_ERRORS,
    before writing anything when the directory exists or the disk is too small."""
    out = Path(options.out)
    if out.exists() and not options.force:
        raise EngramCheckpointError(f"{out} already exists (pass --force to replace it)")
    backbone = backbone_info(options.model)
    cfg = options.config(backbone)
    sizes = table_sizes_for(cfg)
    table_bytes = sum(sum(map(sum, sizes[lid])) for lid in cfg.layer_ids) * \
        table_dtype(options.dtype).row_bytes(cfg.head_dim)
    parent = next(d for d in out.resolve().parents if d.exists())  # init creates the missing ones
    free = shutil.disk_usage(parent).free
    if table_bytes > free:
        raise ValueError(f"tables need {table_bytes / 1e9:.2f} GB but {parent} has only {free / 1e9:.2f} GB free")
    return init_checkpoint(out, cfg, backbone, options.dtype, progress=options.progress, overwrite=options.force)


def _parse_args(argv: list[str] | None) -> InitOptions:
    p = argparse.ArgumentParser(prog="engram-init", description=(
        "Create an Engram checkpoint for a backbone: N(0,1) tables, zeroed value projection "
        "(the model's output equals the backbone's until the memory is trained)."))
    defaults = {f.name: f.default for f in fields(InitOptions) if not callable(f.default_factory)}
    p.add_argument("out", type=Path, help="checkpoint directory to create")
    p.add_argument("--model", default=None, help="GGUF file or HF model dir (default: SmolLM2-135M-Instruct)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rows-per-head", type=int, default=None,
                      help=f"engram_vocab_size for every order (default {DEFAULT_ROWS_PER_VOCAB} x backbone vocab)")
    size.add_argument("--table-gb", type=float, default=None, help="target size of EACH layer's table file in GB")
    p.add_argument("--dtype", default=defaults["dtype"], choices=["bfloat16", "float32", "fp8_e4m3"],
                   help="table dtype")
    p.add_argument("--layers", type=int, nargs="+", default=list(_DEFAULT.layer_ids), help="Engram layer ids")
    for name in ("max_ngram_size", "heads_per_ngram", "head_dim", "kernel_size", "pad_id", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name])
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress bars")
    return InitOptions(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """Console entry `engram-init`; returns a process exit code, errors as one line, no traceback."""
    options = _parse_args(argv)
    try:
        manifest = engram_init(options)
    except INIT_ERRORS as exc:
        print(f"engram-init: error: {exc}", file=sys.stderr)
        return 2
    for lid, entry in manifest["tables"].items():
        print(f"layer {lid}: {entry['file']} {entry['shape'][0]} rows x {entry['shape'][1]} "
              f"{entry['dtype']} = {entry['nbytes'] / 1e9:.3f} GB")
    total = sum(entry["nbytes"] for entry in manifest["tables"].values())
    print(f"wrote {options.out} for backbone {manifest['backbone']['name']} ({total / 1e9:.3f} GB of tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
