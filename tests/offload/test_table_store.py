"""Identical rows from every placement and cache size; stats that add up."""
import numpy as np
import pytest
import torch

import engram_kernels as kernels
from offload.dtypes import table_dtype
from offload import store
from offload.store import TableSet

CONFIGS = [("device", 0), ("host", 0), ("host", 50), ("shared", 0), ("shared", 50), ("mmap", 0), ("mmap", 50)]


def _steps(ckpt, n_steps=6, seed=1):
    rng = np.random.default_rng(seed)
    for step in range(n_steps):
        tokens = int(rng.integers(1, 9))
        yield {layer: np.stack([rng.zipf(1.3, tokens) % size for size in np.diff(np.r_[off, ckpt.values[layer].shape[0]])], 1)
               for layer, off in ckpt.head_offsets.items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_same_rows_from_every_placement_and_cache(ckpt_factory, dtype, compute_dtype):
    """Global row ids in, the stored rows out in the compute dtype, whatever the tier; steps whose
    rows repeat (Zipf-distributed) go through the row cache's hits and misses."""
    ckpt = ckpt_factory(dtype=dtype)
    steps = list(_steps(ckpt))
    for placement, cache_rows in CONFIGS:
        tables = TableSet.open(ckpt.path, ckpt.tables, placement=placement, cache_rows=cache_rows,
                               compute_dtype=compute_dtype, progress=False)
        for rows in steps:
            for layer in (1, 15):
                global_rows = rows[layer] + ckpt.head_offsets[layer]
                got = tables[layer].gather(global_rows).view(*global_rows.shape, -1)
                expected = ckpt.values[layer].to(getattr(torch, dtype))[global_rows].to(compute_dtype)
                assert got.dtype == compute_dtype and got.shape == (*rows[layer].shape, 64)
                assert torch.equal(got, expected), (placement, cache_rows, layer)
        tables.close()


def test_stats_count_lookups_bytes_and_utilisation(ckpt_factory):
    ckpt = ckpt_factory(dtype="bfloat16")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="mmap", cache_rows=0, progress=False)
    rows = np.array([0, 5, 5, 7, 0, 9, 410])
    tables[1].gather(rows)
    tables[1].gather(np.array([5, 411]))
    snap = tables.stats.snapshot()[1]
    assert snap["lookups"] == 9 and snap["cache_hits"] == 0
    assert snap["rows_gathered"] == 5 + 2 and snap["bytes_gathered"] == 7 * 128
    assert snap["rows_touched"] == 6 and snap["rows_touched_ratio"] == pytest.approx(6 / 420)
    assert snap["table_bytes"] == {"mmap": 420 * 128}
    assert snap["gathers"] == 2 and snap["gather_seconds_buckets"][-1][1] == 2
    assert tables.stats.snapshot()[15]["lookups"] == 0


def test_host_load_streams_into_one_buffer(ckpt_factory):
    ckpt = ckpt_factory(dtype="float32")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    tier = tables[15].resident
    assert tier.shape == (508, 64) and torch.equal(tier, ckpt.values[15])
    assert tables.stats.snapshot()[15]["table_bytes"] == {"host": 508 * 64 * 4}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_native_gather_decodes_like_the_table_dtype(dtype, compute_dtype):
    """engram_kernels.gather_rows (a CPU table without a cache) equals the dtype's torch decode of
    the same raw rows, repeats and every fp8 byte and scale included."""
    assert kernels.available()
    spec, g = table_dtype(dtype), torch.Generator().manual_seed(0)
    raw = spec.encode(torch.randn(64, 256, generator=g) * torch.logspace(-30, 30, 64)[:, None])
    if dtype == "fp8_e4m3":  # every e4m3 byte, NaNs included, under scales from 2**-127 to 2**112
        raw[:, :256] = torch.arange(256, dtype=torch.uint8)
        raw[:, 256:] = torch.arange(64 * 8, dtype=torch.int64).view(64, 8).to(torch.uint8) % 240
    rows = torch.tensor([5, 0, 63, 5, 17])
    got = kernels.gather_rows(raw, rows, compute_dtype)
    torch.testing.assert_close(got, spec.decode(raw[rows], compute_dtype), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(IndexError, match=r"row ids must be in \[0, 64\), got 64"):
        kernels.gather_rows(raw, torch.tensor([1, 64]), compute_dtype)


def test_out_of_range_rows_and_bad_placement(ckpt_factory):
    ckpt = ckpt_factory()
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    with pytest.raises(IndexError, match=r"layer 1: row ids must be in \[0, 420\)"):
        tables[1].gather(np.array([420]))
    with pytest.raises(ValueError, match="placement 'disk'"):
        TableSet.open(ckpt.path, ckpt.tables, placement="disk")


@pytest.mark.parametrize("cold", [True, False])
def test_mmap_gathers_use_the_readers_only_when_the_probe_row_came_from_disk(ckpt_factory, monkeypatch, cold):
    ckpt = ckpt_factory(dtype="bfloat16")
    rows = np.random.default_rng(3).integers(0, 508, 3000)
    # The test's file is in the page cache: a threshold of 0 s makes every probe look like a disk read.
    monkeypatch.setattr(store, "_COLD_READ_SECONDS", 0.0 if cold else 1.0)
    mapped = TableSet.open(ckpt.path, ckpt.tables, placement="mmap", progress=False)
    host = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    chunks = []
    submit = mapped[15]._readers.submit
    monkeypatch.setattr(mapped[15]._readers, "submit", lambda fn, *a: chunks.append(len(a[1])) or submit(fn, *a))
    assert torch.equal(mapped[15].gather(rows), host[15].gather(rows))
    unique = len(np.unique(rows))
    assert (len(chunks), sum(chunks)) == ((store._MMAP_READ_THREADS, unique - 1) if cold else (0, 0))
    assert torch.equal(mapped[15].gather(rows[:5]), ckpt.values[15].bfloat16()[rows[:5]].float())
    mapped.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "fp8_e4m3"])
def test_tables_made_from_tensors_in_memory_gather_as_from_files(ckpt_factory, dtype):
    ckpt = ckpt_factory(dtype=dtype)
    files = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    memory = TableSet.from_tensors({lid: files[lid].resident.clone() for lid in (1, 15)}, dtype)
    rows = np.array([0, 7, 7, 419])
    for lid in (1, 15):
        assert memory[lid].head_dim == files[lid].head_dim == 64
        assert torch.equal(memory[lid].gather(rows), files[lid].gather(rows))
    assert memory.stats.snapshot()[1]["lookups"] == 4
