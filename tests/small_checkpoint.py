"""Small Engram checkpoints of known table values (the `ckpt_factory` fixture of tests/conftest.py)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.tablefile import write_table

HEAD_DIM = 64


@dataclass
class SmallCheckpoint:
    path: Path
    tables: dict[str, dict]          # engram.json "tables" section
    head_offsets: dict[int, np.ndarray]
    values: dict[int, torch.Tensor]  # float32 source values per layer

    def manifest(self) -> dict:
        return json.loads((self.path / "engram.json").read_text())


def make_checkpoint(root: Path, dtype: str = "float32", head_sizes: dict[int, list[int]] | None = None,
                    head_dim: int = HEAD_DIM, row_id_values: bool = False, seed: int = 0) -> SmallCheckpoint:
    """Write table_layer{L}.safetensors + engram.json. With row_id_values every entry of row r is r
    (exact in float32 up to 2**24), so a test can read back which row it was given."""
    head_sizes = head_sizes or {1: [101, 103, 107, 109], 15: [113, 127, 131, 137]}
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tables, offsets, values = {}, {}, {}
    for layer, sizes in head_sizes.items():
        num_rows = sum(sizes)
        if row_id_values:
            vals = torch.arange(num_rows, dtype=torch.float32)[:, None].expand(num_rows, head_dim).contiguous()
        else:
            vals = torch.randn(num_rows, head_dim, generator=gen)
        entry = write_table(root / f"table_layer{layer}.safetensors", num_rows, head_dim, dtype,
                            lambda s, e, v=vals: v[s:e], chunk_rows=97, progress=False)
        offsets[layer] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        tables[str(layer)] = {**entry, "head_offsets": offsets[layer].tolist()}
        values[layer] = vals
    manifest = {"format": "engram-serve/1", "config": {}, "tables": tables}
    (root / "engram.json").write_text(json.dumps(manifest))
    return SmallCheckpoint(root, tables, offsets, values)
