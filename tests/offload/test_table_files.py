"""Table files: streaming writer, manifest entry, size/hash checks with errors that name the file."""
import hashlib
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from offload.store import TableSet
from offload.tablefile import TableFileError, check_table, read_header, write_table


def test_written_file_is_safetensors_and_entry_matches(tmp_path):
    values = torch.randn(1000, 64)
    calls = []

    def fill(start, end):
        calls.append((start, end))
        return values[start:end]

    path = tmp_path / "t.safetensors"
    entry = write_table(path, 1000, 64, "bfloat16", fill, chunk_rows=128, progress=False)
    assert calls[0] == (0, 128) and calls[-1] == (896, 1000) and len(calls) == 8  # streamed in chunks
    assert entry == {"file": "t.safetensors", "dtype": "bfloat16", "shape": [1000, 64],
                     "nbytes": os.path.getsize(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    with safe_open(path, "pt") as f:
        assert torch.equal(f.get_tensor("weight"), values.bfloat16())
    header = read_header(path)
    assert header.data_offset % 64 == 0 and header.row_bytes == 128
    assert not list(tmp_path.glob("*.partial"))
    check_table(path, entry, verify_hash=True)


def test_interrupted_write_leaves_no_file(tmp_path):
    def fill(start, end):
        if start >= 200:
            raise RuntimeError("source went away")
        return torch.zeros(end - start, 64)

    with pytest.raises(RuntimeError):
        write_table(tmp_path / "t.safetensors", 1000, 64, "float32", fill, chunk_rows=100, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_named(ckpt_factory):
    ckpt = ckpt_factory()
    path = ckpt.path / ckpt.tables["1"]["file"]
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(TableFileError, match=str(path)) as err:
        TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    assert "truncated" in str(err.value)


def test_missing_file_and_wrong_hash_are_named(ckpt_factory):
    ckpt = ckpt_factory()
    path = ckpt.path / ckpt.tables["15"]["file"]
    bad = {**ckpt.tables["15"], "sha256": "0" * 64}
    check_table(path, bad)  # size is fine: the hash is only checked on request
    with pytest.raises(TableFileError, match=f"{path}.*sha256"):
        check_table(path, bad, verify_hash=True)
    with pytest.raises(TableFileError, match="manifest says 123"):
        check_table(path, {**ckpt.tables["15"], "nbytes": 123})
    path.unlink()
    with pytest.raises(TableFileError, match=f"{path} does not exist"):
        TableSet.open(ckpt.path, ckpt.tables, placement="mmap", progress=False)


def test_not_a_table_file(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(np.arange(100, dtype=np.uint64).tobytes())
    with pytest.raises(TableFileError, match=str(path)):
        read_header(path)
