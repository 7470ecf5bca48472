"""engram.json, the manifest of an Engram checkpoint: the one module that writes, reads and checks it.

A checkpoint is a directory: engram.json, one safetensors file of dense parameters and one table
file per Engram layer. The manifest ties them together: the EngramConfig (which fixes every
table's shape and head offsets), the backbone it was made for, and each file's name, size and
sha256. Every writer (engram-init, engram-convert, training) and reader (the server, training,
the benches) goes through here, so a field is spelled, and a manifest validated, in one place.
Table files themselves are offload's (offload.tablefile); the manifest only names and sizes them.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from offload.dtypes import table_dtype
from offload.tablefile import TableFileError, check_table, file_sha256

from .engram import EngramLayer
from .engram_config import EngramConfig
from .hashing import head_offsets_for, table_sizes_for

FORMAT = "engram-serve/1"
MANIFEST_FILE = "engram.json"
VERIFICATION = "file size is checked at every load; sha256 on request (--verify-tables)"
BACKBONE_FIELDS = ("hidden_size", "num_hidden_layers", "vocab_size")
TABLE_FIELDS = {"file": str, "dtype": str, "shape": list, "head_offsets": list, "nbytes": int, "sha256": str}
DENSE_FIELDS = {"file": str, "sha256": str}


class EngramCheckpointError(Exception):
    """A checkpoint directory is missing, malformed or inconsistent; the message names the file."""


def table_file_name(layer_id: int, tag: str | None = None) -> str:
    """`table_layer1.safetensors`, or with a tag (a dtype, a training step) `table_layer1.fp8_e4m3.safetensors`:
    a rewritten table gets a new name, so the file the manifest names is never overwritten."""
    return f"table_layer{layer_id}.{tag}.safetensors" if tag else f"table_layer{layer_id}.safetensors"


def dense_file_name(tag: str | None = None) -> str:
    return f"dense.{tag}.safetensors" if tag else "dense.safetensors"


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temporary name, flush to disk, rename: a reader sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_dense(ckpt_dir, dense: dict[int, dict[str, torch.Tensor]], name: str | None = None) -> dict:
    """Write every layer's dense state dict as `layers.{id}.{name}`; return the manifest's dense entry."""
    path = Path(ckpt_dir) / (name or dense_file_name())
    tmp = path.with_name(path.name + ".tmp")
    flat = {f"layers.{lid}.{k}": v.detach().to("cpu").contiguous() for lid, sd in dense.items() for k, v in sd.items()}
    save_file(flat, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates 0600; a checkpoint is shared data like the tables
    os.replace(tmp, path)
    return {"file": path.name, "sha256": file_sha256(path, progress=False)}


def _dense_shapes(cfg: EngramConfig, layer_id: int, hidden_size: int) -> dict[str, tuple[int, ...]]:
    """Expected dense parameter shapes of one layer, from a layer built on the meta device (no memory)."""
    with torch.device("meta"):
        layer = EngramLayer(cfg, layer_id, hidden_size, cfg.hc_mult)
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def read_dense(ckpt_dir, manifest: dict, cfg: EngramConfig) -> dict[int, dict[str, torch.Tensor]]:
    """The dense weights per layer, after checking the file's sha256 (it is small) and every shape."""
    path = Path(ckpt_dir) / manifest["dense"]["file"]
    if not path.is_file():
        raise EngramCheckpointError(f"dense weights file {path} does not exist")
    if file_sha256(path, progress=False) != manifest["dense"]["sha256"]:
        raise EngramCheckpointError(f"dense weights file {path} does not match the sha256 in the manifest")
    flat = load_file(str(path))
    dense: dict[int, dict[str, torch.Tensor]] = {}
    for lid in cfg.layer_ids:
        prefix = f"layers.{lid}."
        sd = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        want = _dense_shapes(cfg, lid, manifest["backbone"]["hidden_size"])
        got = {k: tuple(v.shape) for k, v in sd.items()}
        if got != want:
            bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
            raise EngramCheckpointError(f"dense weights file {path}: layer {lid} parameters {bad} "
                                        f"are missing or have the wrong shape")
        dense[lid] = sd
    return dense


def build_manifest(cfg: EngramConfig, backbone: dict, dense_entry: dict, tables: dict[int, dict]) -> dict:
    """A new manifest. `tables[layer_id]` is offload.tablefile.write_table's entry; head offsets are
    added here from the config, so they can never disagree with the hasher."""
    sizes = table_sizes_for(cfg)
    return {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "backbone": dict(backbone),
        "dense": dict(dense_entry),
        "tables": {str(lid): {**tables[lid], "head_offsets": head_offsets_for(sizes[lid]).tolist()}
                   for lid in cfg.layer_ids},
        "verification": VERIFICATION,
    }


def with_files(manifest: dict, dense: dict | None = None, tables: dict[int, dict] | None = None) -> dict:
    """A copy of `manifest` naming rewritten files: the dense entry replaced, each given table entry
    laid over the old one (head offsets kept); every other field untouched."""
    new = copy.deepcopy(manifest)
    if dense is not None:
        new["dense"] = dict(dense)
    for lid, entry in (tables or {}).items():
        new["tables"][str(lid)] = {**new["tables"][str(lid)], **entry}
    return new


def manifest_files(manifest: dict) -> set[str]:
    """The names of the files a manifest points to."""
    return {manifest["dense"]["file"], *(entry["file"] for entry in manifest["tables"].values())}


def write_manifest(ckpt_dir, manifest: dict) -> None:
    """Validate, then write engram.json atomically; writers write it last (a directory without it
    is not a checkpoint), once every file it names is complete."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    validate_manifest(manifest, path)
    write_json_atomic(path, manifest)


def read_manifest(ckpt_dir) -> tuple[dict, EngramConfig]:
    """Parse and validate engram.json (no file contents read): the manifest and its config."""
    path = Path(ckpt_dir) / MANIFEST_FILE
    if not Path(ckpt_dir).is_dir():
        raise EngramCheckpointError(f"Engram checkpoint directory {ckpt_dir} does not exist")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngramCheckpointError(f"{path} does not exist (not an Engram checkpoint, or an unfinished write)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngramCheckpointError(f"{path} is not valid JSON: {exc}") from None
    return manifest, validate_manifest(manifest, path)


def _check_fields(entry, fields: dict[str, type], what: str, path: Path) -> None:
    if not isinstance(entry, dict):
        raise EngramCheckpointError(f"{path}: {what} is not an object")
    wrong = [name for name, kind in fields.items() if not isinstance(entry.get(name), kind)]
    if wrong:
        raise EngramCheckpointError(f"{path}: {what} lacks or mistypes field(s) {wrong}")


def validate_manifest(manifest, path: Path) -> EngramConfig:
    """Every field a reader relies on, and each table's shape and head offsets against the config."""
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
    _check_fields(manifest["backbone"], dict.fromkeys(BACKBONE_FIELDS, int), "'backbone'", path)
    _check_fields(manifest["dense"], DENSE_FIELDS, "'dense'", path)
    if set(manifest["tables"]) != {str(lid) for lid in cfg.layer_ids}:
        raise EngramCheckpointError(f"{path}: 'tables' has layers {sorted(manifest['tables'])}, "
                                    f"config.layer_ids is {cfg.layer_ids}")
    sizes = table_sizes_for(cfg)
    for lid in cfg.layer_ids:
        entry = manifest["tables"][str(lid)]
        _check_fields(entry, TABLE_FIELDS, f"the table of layer {lid}", path)
        want_shape = [int(sum(map(sum, sizes[lid]))), cfg.head_dim]
        if entry["shape"] != want_shape:
            raise EngramCheckpointError(f"{path}: table of layer {lid} has shape {entry['shape']}, "
                                        f"the config implies {want_shape}")
        if entry["head_offsets"] != head_offsets_for(sizes[lid]).tolist():
            raise EngramCheckpointError(f"{path}: head_offsets of layer {lid} do not match the config")
        try:
            table_dtype(entry["dtype"])
        except ValueError as exc:
            raise EngramCheckpointError(f"{path}: table of layer {lid}: {exc}") from None
    return cfg


def check_tables(ckpt_dir, manifest: dict, verify_hash: bool = False) -> None:
    """Check every table file against its entry: size and header always, sha256 if asked (a full read)."""
    for lid, entry in manifest["tables"].items():
        try:
            check_table(Path(ckpt_dir) / entry["file"], entry, verify_hash=verify_hash)
        except TableFileError as exc:
            raise EngramCheckpointError(f"Engram checkpoint {ckpt_dir}: {exc}") from None
