"""Engram checkpoints opened for serving and training, and fresh ones written for a backbone.

Opening checks everything cheap on every start (manifest fields, table shapes and file sizes,
the small dense file's sha256) and the sha256 of the tables only on request, because hashing
tens of GB would make every server start take minutes. A fresh checkpoint (engram-init's) has
N(0, 1) tables and a zeroed value projection, so the model equals its backbone until trained.
The files' format is checkpoint_format's; table files are offload's (offload.tablefile).
"""
from __future__ import annotations

import functools
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.dtypes import table_dtype
from offload.tablefile import write_table

from .checkpoint_format import (EngramCheckpointError, build_manifest, check_tables, read_dense, read_manifest,
                                table_file_name, write_dense, write_manifest)
from .engram import EngramLayer
from .engram_config import EngramConfig
from .hashing import table_sizes_for

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

    def table_path(self, layer_id: int) -> Path:
        return self.path / self.tables_manifest[str(layer_id)]["file"]

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
    check_tables(ckpt_dir, manifest, verify_hash=verify_tables)
    return EngramCheckpoint(ckpt_dir, cfg, manifest, read_dense(ckpt_dir, manifest, cfg))


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
        manifest = build_manifest(cfg, backbone, dense, tables)
        write_manifest(partial, manifest)
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
