"""Engram checkpoints: a directory with engram.json, dense.safetensors and one table file per layer.

The manifest is the single place that ties a checkpoint together: the EngramConfig
(which fixes every table's shape and head offsets), the backbone it was made for,
and each file's size and sha256. Loading checks everything cheap on every start
(manifest fields, table shapes and file sizes, the small dense file's sha256) and
the sha256 of the tables only on request, because hashing tens of GB would make
every server start take minutes. Table files themselves are offload/'s business
(offload.tablefile); this module only names them and checks them through it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from offload.dtypes import table_dtype
from offload.tablefile import TableFileError, check_table, file_sha256, write_table

from .engram import EngramLayer
from .engram_config import EngramConfig
from .hashing import head_offsets_for, table_sizes_for

FORMAT = "engram-serve/1"
MANIFEST_FILE = "engram.json"
DENSE_FILE = "dense.safetensors"
VERIFICATION = "file size is checked at every load; sha256 on request (--verify-tables)"
BACKBONE_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")


class EngramCheckpointError(Exception):
    """A checkpoint directory is missing, malformed or inconsistent; the message names the file."""


def table_file_name(layer_id: int) -> str:
    return f"table_layer{layer_id}.safetensors"


def _dense_shapes(cfg: EngramConfig, layer_id: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Expected dense parameter shapes of one layer, from a layer built on the meta device (no memory)."""
    with torch.device("meta"):
        layer = EngramLayer(cfg, layer_id, hidden_size, cfg.hc_mult)
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def write_dense(ckpt_dir, dense: dict[int, dict[str, torch.Tensor]]) -> dict:
    """Write every layer's dense state dict as `layers.{id}.{name}`; return the manifest entry."""
    path = Path(ckpt_dir) / DENSE_FILE
    flat = {f"layers.{lid}.{k}": v.detach().to("cpu").contiguous() for lid, sd in dense.items() for k, v in sd.items()}
    save_file(flat, str(path))
    os.chmod(path, 0o644)  # safetensors creates 0600; a checkpoint is shared data like the tables
    return {"file": DENSE_FILE, "sha256": file_sha256(path, progress=False)}


def write_manifest(ckpt_dir, cfg: EngramConfig, backbone: dict, dense_entry: dict,
                   tables: dict[int, dict]) -> dict:
    """Write engram.json last and atomically (a directory without it is not a checkpoint).

    `tables[layer_id]` is offload.tablefile.write_table's entry; head offsets are added here
    from the config, so they can never disagree with the hasher.
    """
    sizes = table_sizes_for(cfg)
    manifest = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "backbone": dict(backbone),
        "dense": dict(dense_entry),
        "tables": {str(lid): {**tables[lid], "head_offsets": head_offsets_for(sizes[lid]).tolist()}
                   for lid in cfg.layer_ids},
        "verification": VERIFICATION,
    }
    path = Path(ckpt_dir) / MANIFEST_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)
    return manifest


def read_manifest(ckpt_dir) -> tuple[dict, EngramConfig]:
    """Parse and validate engram.json against the config it carries (no file contents read)."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    if not Path(ckpt_dir).is_dir():
        raise EngramCheckpointError(f"Engram checkpoint directory {ckpt_dir} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngramCheckpointError(f"{path} does not exist (not an Engram checkpoint, or an unfinished write)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngramCheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngramCheckpointError(f"{path}: format {got!r} is not {FORMAT!r}")
    for key in ("config", "backbone", "dense", "tables"):
        if not isinstance(manifest.get(key), dict):
            raise EngramCheckpointError(f"{path}: field {key!r} is missing or not an object")
    try:
        cfg = EngramConfig.from_dict(manifest["config"])
    except (TypeError, ValueError) as exc:
        raise EngramCheckpointError(f"{path}: bad 'config': {exc}") from None
    missing = [f for f in BACKBONE_FIELDS if not isinstance(manifest["backbone"].get(f), int)]
    if missing:
        raise EngramCheckpointError(f"{path}: 'backbone' lacks integer field(s) {missing}")
    if set(manifest["tables"]) != {str(lid) for lid in cfg.layer_ids}:
        raise EngramCheckpointError(f"{path}: 'tables' has layers {sorted(manifest['tables'])}, "
                                    f"config.layer_ids is {cfg.layer_ids}")
    sizes = table_sizes_for(cfg)
    for lid in cfg.layer_ids:
        entry = manifest["tables"][str(lid)]
        want_shape = [int(sum(map(sum, sizes[lid]))), cfg.head_dim]
        if list(entry.get("shape", [])) != want_shape:
            raise EngramCheckpointError(f"{path}: table of layer {lid} has shape {entry.get('shape')}, "
                                        f"the config implies {want_shape}")
        if list(entry.get("head_offsets", [])) != head_offsets_for(sizes[lid]).tolist():
            raise EngramCheckpointError(f"{path}: head_offsets of layer {lid} do not match the config")
        if not isinstance(entry.get("file"), str):
            raise EngramCheckpointError(f"{path}: table of layer {lid} names no 'file'")
    return manifest, cfg


@dataclass
class EngramCheckpoint:
    """A loaded, validated checkpoint: config, manifest and dense weights (tables stay on disk)."""

    path: Path
    config: EngramConfig
    manifest: dict
    dense: dict[int, dict[str, torch.Tensor]]

    @property
    def backbone(self) -> dict:
        return self.manifest["backbone"]

    @property
    def tables_manifest(self) -> dict[str, dict]:
        """What offload's TableSet.open takes (keys are layer ids as strings)."""
        return self.manifest["tables"]

    @property
    def head_offsets(self) -> dict[int, np.ndarray]:
        return {int(lid): np.asarray(e["head_offsets"], dtype=np.int64) for lid, e in self.tables_manifest.items()}

    def check_backbone(self, hidden_size: int, num_hidden_layers: int, vocab_size: int) -> None:
        """Refuse to attach this memory to a backbone of another shape (names may differ: quantisations)."""
        given = {"hidden_size": hidden_size, "num_hidden_layers": num_hidden_layers, "vocab_size": vocab_size}
        wrong = {k: (self.backbone[k], v) for k, v in given.items() if self.backbone[k] != v}
        if wrong:
            detail = ", ".join(f"{k} {a} (checkpoint) vs {b} (model)" for k, (a, b) in wrong.items())
            raise EngramCheckpointError(f"Engram checkpoint {self.path} was made for backbone "
                                        f"{self.backbone.get('name')!r}, which differs: {detail}")
        if max(self.config.layer_ids) >= num_hidden_layers:
            raise EngramCheckpointError(f"Engram checkpoint {self.path}: layer_ids {self.config.layer_ids} "
                                        f"exceed the model's {num_hidden_layers} layers")

    def build_layers(self, dtype: torch.dtype = torch.float32, device="cpu") -> dict[int, EngramLayer]:
        """EngramLayers with this checkpoint's dense weights, for serving: eval mode, gradients off
        (a trainer turns them back on with requires_grad_(True))."""
        layers = {}
        for lid in self.config.layer_ids:
            layer = EngramLayer(self.config, lid, self.backbone["hidden_size"], self.config.hc_mult)
            layer.load_state_dict(self.dense[lid])
            layers[lid] = layer.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return layers


def load_checkpoint(ckpt_dir, verify_tables: bool = False) -> EngramCheckpoint:
    """Open a checkpoint: validate the manifest, check every table file (size always, sha256 if
    verify_tables) and the dense file (sha256 always: it is small), load the dense weights."""
    ckpt_dir = Path(ckpt_dir)
    manifest, cfg = read_manifest(ckpt_dir)
    for lid in cfg.layer_ids:
        entry = manifest["tables"][str(lid)]
        try:
            check_table(ckpt_dir / entry["file"], entry, verify_hash=verify_tables)
        except TableFileError as exc:
            raise EngramCheckpointError(f"Engram checkpoint {ckpt_dir}: {exc}") from None
    dense_path = ckpt_dir / str(manifest["dense"].get("file", DENSE_FILE))
    if not dense_path.is_file():
        raise EngramCheckpointError(f"dense weights file {dense_path} does not exist")
    if file_sha256(dense_path, progress=False) != manifest["dense"].get("sha256"):
        raise EngramCheckpointError(f"dense weights file {dense_path} does not match the sha256 in the manifest")
    flat = load_file(str(dense_path))
    dense: dict[int, dict[str, torch.Tensor]] = {}
    for lid in cfg.layer_ids:
        prefix = f"layers.{lid}."
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        want = _dense_shapes(cfg, lid, manifest["backbone"]["hidden_size"])
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != want:
            bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise EngramCheckpointError(f"dense weights file {dense_path}: layer {lid} parameters {bad} "
                                        f"are missing or have the wrong shape")
        dense[lid] = sd
    return EngramCheckpoint(ckpt_dir, cfg, manifest, dense)


# ---------------------------------------------------------------------------------------------
# engram-init: a fresh checkpoint whose output is zero until trained

# The reference sizes each head at 5x its backbone's vocabulary; the default here does the same.
DEFAULT_ROWS_PER_VOCAB = 5
_INIT_BLOCK_ROWS = 1 << 16


def default_config(vocab_size: int, rows_per_head: int | None = None) -> EngramConfig:
    """The default layout for a SmolLM2-135M-sized backbone: layers 1 and 15, orders 2 and 3,
    8 heads of 64 dims per order."""
    rows = int(rows_per_head or DEFAULT_ROWS_PER_VOCAB * vocab_size)
    return EngramConfig(engram_vocab_size=[rows, rows], max_ngram_size=3, n_embed_per_ngram=512,
                        n_head_per_ngram=8, layer_ids=[1, 15], pad_id=2, seed=0, kernel_size=4, hc_mult=1)


def rows_per_head_for_size(table_gb: float, heads_total: int, head_dim: int, dtype: str) -> int:
    """Rows per head so that one layer's table file is about `table_gb` GB (1e9 bytes)."""
    row_bytes = table_dtype(dtype).row_bytes(head_dim)
    return max(2, int(table_gb * 1e9) // (heads_total * row_bytes))


def init_dense(cfg: EngramConfig, layer_id: int, hidden_size: int) -> dict[str, torch.Tensor]:
    """torch's default initialisation (seeded, so init is reproducible) with the value projection
    zeroed: the layer outputs exactly zero, so the model equals its backbone until trained, while
    the gate path starts from ordinary random projections for training to move."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + layer_id)
        layer = EngramLayer(cfg, layer_id, hidden_size, cfg.hc_mult)
    torch.nn.init.zeros_(layer.value_proj.weight)
    torch.nn.init.zeros_(layer.value_proj.bias)
    return layer.state_dict()


def normal_rows(seed: int, layer_id: int, head_dim: int):
    """fill(start, end) for write_table: N(0, 1) rows like nn.Embedding's init, drawn in fixed
    blocks with their own seeds so the table does not depend on the writer's chunk size."""
    def fill(start: int, end: int) -> torch.Tensor:
        first, last = start // _INIT_BLOCK_ROWS, (end - 1) // _INIT_BLOCK_ROWS
        blocks = []
        for block in range(first, last + 1):
            state = np.random.SeedSequence([seed, layer_id, block]).generate_state(1, np.uint64)[0]
            gen = torch.Generator().manual_seed(int(state))
            blocks.append(torch.randn(_INIT_BLOCK_ROWS, head_dim, generator=gen))
        rows = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        offset = start - first * _INIT_BLOCK_ROWS
        return rows[offset: offset + end - start]
    return fill


def init_checkpoint(out_dir, cfg: EngramConfig, backbone: dict, dtype: str = "bfloat16",
                    progress: bool = True, overwrite: bool = False) -> dict:
    """Write a fresh checkpoint; everything goes to `<out_dir>.partial` and is renamed at the end,
    so an interrupted run never leaves a directory that looks like a checkpoint."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise EngramCheckpointError(f"{out} already exists (pass --force to replace it)")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    sizes = table_sizes_for(cfg)
    try:
        tables = {lid: write_table(partial / table_file_name(lid), int(sum(map(sum, sizes[lid]))), cfg.head_dim,
                                   dtype, normal_rows(cfg.seed, lid, cfg.head_dim), chunk_rows=_INIT_BLOCK_ROWS,
                                   progress=progress)
                  for lid in cfg.layer_ids}
        dense = write_dense(partial, {lid: init_dense(cfg, lid, backbone["hidden_size"]) for lid in cfg.layer_ids})
        manifest = write_manifest(partial, cfg, backbone, dense, tables)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    return manifest


def backbone_info(model: str | None) -> dict:
    """The manifest's 'backbone' block, read from a GGUF file's metadata or an HF config.json."""
    return dict(_read_backbone(model))


@functools.lru_cache(maxsize=8)
def _read_backbone(model: str | None) -> dict:
    """Cached: parsing a GGUF's metadata (its whole tokenizer vocabulary) takes seconds."""
    from gguf import GGUFReader

    from .gguf_loader import read_config
    from .safetensors_loader import read_hf_config
    from .weights import is_gguf, resolve_model_path

    path = resolve_model_path(model)
    mc = read_config(GGUFReader(path), path) if is_gguf(path) else read_hf_config(Path(path))
    return {"name": Path(path).name, "hidden_size": mc.hidden_size,
            "num_hidden_layers": mc.num_hidden_layers, "vocab_size": mc.vocab_size}


def _parse_init_args(argv):
    p = argparse.ArgumentParser(prog="engram-init", description=(
        "Create an Engram checkpoint for a backbone: N(0,1) tables, zeroed value projection "
        "(the model's output equals the backbone's until the memory is trained)."))
    p.add_argument("out", help="checkpoint directory to create")
    p.add_argument("--model", default=None, help="GGUF file or HF model dir (default: SmolLM2-135M-Instruct)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--rows-per-head", type=int, default=None,
                      help=f"engram_vocab_size for every order (default {DEFAULT_ROWS_PER_VOCAB} x backbone vocab)")
    size.add_argument("--table-gb", type=float, default=None, help="target size of EACH layer's table file in GB")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "fp8_e4m3"], help="table dtype")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 15], help="Engram layer ids")
    p.add_argument("--max-ngram-size", type=int, default=3)
    p.add_argument("--heads-per-ngram", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--kernel-size", type=int, default=4)
    p.add_argument("--pad-id", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def init_main(argv: list[str] | None = None) -> int:
    """Console entry `engram-init`; returns a process exit code, errors as one line, no traceback."""
    args = _parse_init_args(argv)
    try:
        if Path(args.out).exists() and not args.force:
            raise EngramCheckpointError(f"{args.out} already exists (pass --force to replace it)")
        backbone = backbone_info(args.model)
        heads_total = (args.max_ngram_size - 1) * args.heads_per_ngram
        rows = args.rows_per_head
        if args.table_gb is not None:
            if args.table_gb <= 0:
                raise ValueError(f"--table-gb must be positive, got {args.table_gb}")
            rows = rows_per_head_for_size(args.table_gb, heads_total, args.head_dim, args.dtype)
        rows = rows or DEFAULT_ROWS_PER_VOCAB * backbone["vocab_size"]
        cfg = EngramConfig(engram_vocab_size=[rows] * (args.max_ngram_size - 1), max_ngram_size=args.max_ngram_size,
                           n_embed_per_ngram=args.head_dim * args.heads_per_ngram,
                           n_head_per_ngram=args.heads_per_ngram, layer_ids=args.layers, pad_id=args.pad_id,
                           seed=args.seed, kernel_size=args.kernel_size, hc_mult=1)
        if max(cfg.layer_ids) >= backbone["num_hidden_layers"] or cfg.pad_id >= backbone["vocab_size"]:
            raise ValueError(f"layers {cfg.layer_ids} / pad id {cfg.pad_id} do not fit backbone {backbone}")
        sizes = table_sizes_for(cfg)
        table_bytes = sum(sum(map(sum, sizes[lid])) for lid in cfg.layer_ids) * \
            table_dtype(args.dtype).row_bytes(cfg.head_dim)
        free = shutil.disk_usage(Path(args.out).resolve().parent).free
        if table_bytes > free:
            raise ValueError(f"tables need {table_bytes / 1e9:.2f} GB but {Path(args.out).resolve().parent} "
                             f"has only {free / 1e9:.2f} GB free")
        manifest = init_checkpoint(args.out, cfg, backbone, args.dtype, progress=not args.quiet,
                                   overwrite=args.force)
    except (EngramCheckpointError, TableFileError, ValueError, OSError) as exc:
        print(f"engram-init: error: {exc}", file=sys.stderr)
        return 2
    for lid, entry in manifest["tables"].items():
        print(f"layer {lid}: {entry['file']} {entry['shape'][0]} rows x {entry['shape'][1]} "
              f"{entry['dtype']} = {entry['nbytes'] / 1e9:.3f} GB")
    print(f"wrote {args.out} for backbone {backbone['name']} ({table_bytes / 1e9:.3f} GB of tables)")
    return 0
