"""Atomic, resumable Engram checkpoints written in place, in the serving format.

The checkpoint directory is the one `engram-serve --engram DIR` loads: `engram.json`
names the dense file and one table file per layer. Training never overwrites a file that a
manifest names. Each save writes NEW files whose names carry the step
(`dense.step000200.safetensors`, `table_layer1.step000200.safetensors`,
`train_optim.step000200.pt`), each to a `.tmp` name first and renamed when complete; then
two small pointer files are replaced with `os.replace` (atomic on POSIX):

1. `train_state.json`: what `--resume` reads: step, the files of that step, run settings;
2. `engram.json`: what the server reads.

Only then are files that neither pointer names deleted. A `kill -9` at any instant leaves
each pointer naming complete files of one step, so the checkpoint on disk is never
half-written; if the kill fell between the two pointer writes, `--resume` rolls engram.json
forward to train_state.json's step before loading.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engram_runtime.checkpoint import EngramCheckpoint, load_checkpoint
from engram_runtime.checkpoint_format import (MANIFEST_FILE, EngramCheckpointError, dense_file_name, manifest_files,
                                              read_manifest, table_file_name, with_files, write_dense,
                                              write_json_atomic, write_manifest)
from offload.dtypes import table_dtype
from offload.tablefile import TENSOR_NAME, write_table

TRAIN_STATE = "train_state.json"
TRAINABLE_DTYPES = ("float32", "bfloat16")
_VERSIONED = re.compile(r".*\.step\d{6,}\.(safetensors|pt)$")


class CheckpointError(Exception):
    """The Engram checkpoint or its training state is missing or inconsistent (names the file)."""


@dataclass
class LoadedCheckpoint:
    ckpt: EngramCheckpoint                      # manifest, config, dense weights (validated)
    tables: dict[int, torch.Tensor]             # layer_id -> [rows, head_dim] in storage dtype


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"missing {path.name} in the checkpoint directory {path.parent}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def load_for_training(ckpt_dir: Path) -> LoadedCheckpoint:
    """The serving loader's validated checkpoint plus whole tables in their storage dtype.

    Tables must be float32 or bfloat16: sparse updates of fp8 rows would round most of
    them away, so train in bf16/fp32 and convert afterwards with engram-convert.
    """
    try:
        ckpt = load_checkpoint(ckpt_dir)
    except EngramCheckpointError as e:
        raise CheckpointError(str(e)) from e
    tables = {}
    for lid in ckpt.config.layer_ids:
        entry, path = ckpt.tables_manifest[str(lid)], ckpt.table_path(lid)
        if entry["dtype"] not in TRAINABLE_DTYPES:
            raise CheckpointError(f"table {path} is {entry['dtype']}; training needs float32 or bfloat16 "
                                  f"rows (train in bf16/fp32, then convert with engram-convert)")
        with safe_open(str(path), framework="pt") as f:
            tables[lid] = f.get_tensor(TENSOR_NAME).to(table_dtype(entry["dtype"]).torch_raw)
    return LoadedCheckpoint(ckpt, tables)


def complete_interrupted_commit(ckpt_dir: Path, state: dict) -> None:
    """A kill between the two pointer writes leaves train_state.json one save ahead of
    engram.json; finish that commit (roll forward) so both name the same step."""
    try:
        current = read_manifest(ckpt_dir)[0]
    except EngramCheckpointError:
        current = None
    if current != state["manifest"]:
        write_manifest(ckpt_dir, state["manifest"])


def save_checkpoint(ckpt_dir: Path, step: int, manifest: dict,
                    dense: dict[int, dict[str, torch.Tensor]], tables: dict[int, torch.Tensor],
                    train_state: dict) -> dict:
    """Write the step's files, then commit train_state.json and engram.json, then collect garbage;
    return the new manifest."""
    tag = f"step{step:06d}"
    dense_entry = write_dense(ckpt_dir, dense, dense_file_name(tag))
    table_entries = {lid: write_table(ckpt_dir / table_file_name(lid, tag), table.shape[0], table.shape[1],
                                      manifest["tables"][str(lid)]["dtype"],
                                      fill=lambda s, e, t=table: t[s:e].float(), progress=False)
                     for lid, table in tables.items()}
    new_manifest = with_files(manifest, dense=dense_entry, tables=table_entries)
    optim_name = f"train_optim.{tag}.pt"
    torch.save(train_state.pop("tensors"), ckpt_dir / (optim_name + ".tmp"))
    os.replace(ckpt_dir / (optim_name + ".tmp"), ckpt_dir / optim_name)
    write_json_atomic(ckpt_dir / TRAIN_STATE, {**train_state, "step": step, "optim_file": optim_name,
                                               "manifest": new_manifest})
    write_manifest(ckpt_dir, new_manifest)
    collect_garbage(ckpt_dir, previous=manifest)
    return new_manifest


def load_train_state(ckpt_dir: Path) -> tuple[dict, dict]:
    """(train_state.json, its tensors: optimizer states and RNG) for `--resume`."""
    state = read_json(ckpt_dir / TRAIN_STATE)
    path = ckpt_dir / state["optim_file"]
    if not path.is_file():
        raise CheckpointError(f"missing optimizer state {path} named by {ckpt_dir / TRAIN_STATE}")
    return state, torch.load(path, weights_only=True)


def collect_garbage(ckpt_dir: Path, previous: dict | None = None) -> None:
    """Delete half-written files, and versioned files no pointer names any more.

    `previous` is the manifest training started from: its files (e.g. the unversioned ones of
    `engram-init`) go too once superseded, so a multi-GB table is not kept twice on disk.
    """
    keep: set[str] = set()
    if (ckpt_dir / MANIFEST_FILE).is_file():
        keep |= manifest_files(read_manifest(ckpt_dir)[0])
    if (ckpt_dir / TRAIN_STATE).is_file():
        state = read_json(ckpt_dir / TRAIN_STATE)
        keep |= {state["optim_file"], *manifest_files(state["manifest"])}
    superseded = manifest_files(previous) if previous else set()
    for f in ckpt_dir.iterdir():
        stale = _VERSIONED.match(f.name) or f.name in superseded
        if f.name.endswith((".tmp", ".partial")) or (stale and f.name not in keep):
            f.unlink(missing_ok=True)

