"""Engram table files: one safetensors file per layer table, written and checked in bounded memory.

A table file is a plain safetensors file holding one tensor ``"weight"`` of raw rows (see
``offload.dtypes``) plus ``__metadata__`` naming the logical dtype and head_dim, so any
safetensors reader can open it, and ``numpy.memmap`` can map it at the data offset (the header
is padded so the data starts on a 64-byte boundary).

Tables reach tens of GB, so the writer streams: it asks ``fill(start, end)`` for one chunk of
float32 rows at a time, encodes it, hashes it and writes it, never holding more than a chunk.
The sha256 is computed while writing (over the whole file), so the manifest entry costs no second
pass. The file is written under a ``.partial`` name and renamed at the end: an interrupted write
never leaves a file that looks complete. ``nbytes`` in the manifest is the whole file's size;
it is checked at every load (cheap), the sha256 only on request (a full read).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from offload.dtypes import TableDType, table_dtype

TENSOR_NAME = "weight"
_ALIGN = 64
_CHUNK_BYTES = 32 << 20
_HASH_BLOCK = 8 << 20


class TableFileError(Exception):
    """A table file is missing, truncated, malformed or not the one the manifest describes.

    The message always names the file path.
    """


@dataclass(frozen=True)
class TableHeader:
    """What a table file's safetensors header says, validated against the file size."""

    path: Path
    dtype: TableDType
    num_rows: int
    head_dim: int
    data_offset: int   # byte offset of the first raw row in the file
    file_nbytes: int

    @property
    def raw_row_elems(self) -> int:
        return self.dtype.raw_row_elems(self.head_dim)

    @property
    def row_bytes(self) -> int:
        return self.dtype.row_bytes(self.head_dim)


def _header_bytes(dtype: TableDType, num_rows: int, head_dim: int) -> bytes:
    data_nbytes = num_rows * dtype.row_bytes(head_dim)
    header = {
        "__metadata__": {"format": "engram-serve/table", "dtype": dtype.name, "head_dim": str(head_dim)},
        TENSOR_NAME: {"dtype": dtype.safetensors_raw, "shape": [num_rows, dtype.raw_row_elems(head_dim)],
                      "data_offsets": [0, data_nbytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-(8 + len(text))) % _ALIGN)  # safetensors allows trailing spaces
    return struct.pack("<Q", len(text)) + text


def write_table(path, num_rows: int, head_dim: int, dtype: str,
                fill: Callable[[int, int], torch.Tensor], chunk_rows: int | None = None,
                progress: bool = True) -> dict:
    """Stream a table to `path`; return its manifest entry {file, dtype, shape, nbytes, sha256}.

    fill(start, end) must return float32 values [end - start, head_dim] for those rows.
    """
    path = Path(path)
    spec = table_dtype(dtype)
    spec.check_head_dim(head_dim)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (4 * head_dim))
    partial = path.with_name(path.name + ".partial")
    digest = hashlib.sha256()
    header = _header_bytes(spec, num_rows, head_dim)
    try:
        with open(partial, "wb") as f, tqdm(total=num_rows * spec.row_bytes(head_dim), unit="B",
                                             unit_scale=True, desc=f"write {path.name}",
                                             disable=not progress) as bar:
            f.write(header)
            digest.update(header)
            for start in range(0, num_rows, chunk_rows):
                end = min(num_rows, start + chunk_rows)
                values = fill(start, end)
                if tuple(values.shape) != (end - start, head_dim):
                    raise TableFileError(f"{path}: fill({start}, {end}) returned shape "
                                         f"{tuple(values.shape)}, expected {(end - start, head_dim)}")
                raw = spec.encode(values).view(torch.uint8).numpy()
                digest.update(raw.data)
                f.write(raw.data)
                bar.update(raw.nbytes)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return {"file": path.name, "dtype": spec.name, "shape": [num_rows, head_dim],
            "nbytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_header(path) -> TableHeader:
    """Parse and validate a table file's header; raise TableFileError naming the file."""
    path = Path(path)
    try:
        file_nbytes = path.stat().st_size
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > min(file_nbytes, 1 << 24):
                raise TableFileError(f"table file {path}: header length {header_len} is impossible "
                                     f"for a {file_nbytes}-byte file (not a safetensors table?)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise TableFileError(f"table file {path} does not exist") from None
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TableFileError(f"table file {path} has no valid safetensors header ({exc})") from None
    meta = header.get("__metadata__") or {}
    tensor = header.get(TENSOR_NAME)
    if tensor is None or "dtype" not in meta or "head_dim" not in meta:
        raise TableFileError(f"table file {path} is not an engram-serve table "
                             f"(needs tensor {TENSOR_NAME!r} and dtype/head_dim metadata)")
    try:
        spec = table_dtype(meta["dtype"])
    except ValueError as exc:
        raise TableFileError(f"table file {path}: {exc}") from None
    head_dim = int(meta["head_dim"])
    num_rows, elems = tensor["shape"]
    begin, end = tensor["data_offsets"]
    if elems != spec.raw_row_elems(head_dim) or end - begin != num_rows * spec.row_bytes(head_dim):
        raise TableFileError(f"table file {path}: tensor shape {tensor['shape']} / offsets "
                             f"{tensor['data_offsets']} do not match dtype {spec.name}, head_dim {head_dim}")
    data_offset = 8 + header_len + begin
    if file_nbytes != data_offset + (end - begin):
        raise TableFileError(f"table file {path} is {file_nbytes} bytes but its header describes "
                             f"{data_offset + end - begin} bytes (truncated or corrupted)")
    return TableHeader(path, spec, num_rows, head_dim, data_offset, file_nbytes)


def map_rows(header: TableHeader) -> np.memmap:
    """Map the raw rows read-only: [num_rows, raw_row_elems] of dtype.numpy_raw, zero copy."""
    try:
        return np.memmap(header.path, dtype=header.dtype.numpy_raw, mode="r", offset=header.data_offset,
                         shape=(header.num_rows, header.raw_row_elems))
    except (OSError, ValueError) as exc:
        raise TableFileError(f"table file {header.path} cannot be mapped: {exc}") from None


def file_sha256(path, progress: bool = True) -> str:
    """sha256 of a whole file, read in blocks (bounded memory)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"sha256 {path.name}", disable=not progress) as bar:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def check_table(path, entry: dict, verify_hash: bool = False) -> None:
    """Check a table file against its manifest entry: size and header always, sha256 on request."""
    path = Path(path)
    header = read_header(path)
    if "nbytes" in entry and header.file_nbytes != int(entry["nbytes"]):
        raise TableFileError(f"table file {path} is {header.file_nbytes} bytes, the manifest says "
                             f"{entry['nbytes']} (truncated or a different file)")
    if "dtype" in entry and table_dtype(entry["dtype"]).name != header.dtype.name:
        raise TableFileError(f"table file {path} holds {header.dtype.name}, the manifest says {entry['dtype']}")
    if "shape" in entry and list(entry["shape"]) != [header.num_rows, header.head_dim]:
        raise TableFileError(f"table file {path} has shape {[header.num_rows, header.head_dim]}, "
                             f"the manifest says {list(entry['shape'])}")
    if verify_hash:
        if "sha256" not in entry:
            raise TableFileError(f"table file {path}: the manifest has no sha256 to verify against")
        actual = file_sha256(path)
        if actual != entry["sha256"]:
            raise TableFileError(f"table file {path} has sha256 {actual}, the manifest says {entry['sha256']}")
