"""Prefetcher: rows never cross steps or sequences; worker errors surface in wait(); the native
worker returns (and hashes) what the Python worker (and the hasher) does."""
import os
import threading

import numpy as np
import pytest
import torch

import engram_kernels as kernels
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.hashing import NgramHasher
from offload.prefetch import NativeTicket, PrefetchError, Prefetcher, Projection, WorkerTicket
from offload.store import TableSet


@pytest.mark.parametrize("placement,cache_rows", [("host", 0), ("mmap", 64)])
def test_changing_batch_membership_never_returns_another_steps_rows(ckpt_factory, placement, cache_rows):
    # every entry of row r is r, so each returned vector says which row it was
    ckpt = ckpt_factory(row_id_values=True)
    tables = TableSet.open(ckpt.path, ckpt.tables, placement=placement, cache_rows=cache_rows, progress=False)
    rng = np.random.default_rng(0)
    heads = {layer: np.diff(np.r_[off, ckpt.values[layer].shape[0]]) for layer, off in ckpt.head_offsets.items()}
    live: dict[int, int] = {}  # sequence id -> its private row seed
    next_seq = 0
    with Prefetcher(tables, ckpt.head_offsets) as prefetcher:
        in_flight = []
        for step in range(60):
            for seq in [s for s in live if rng.random() < 0.3]:  # finish some
                del live[seq]
            for _ in range(rng.integers(0, 4)):                   # join some (prefill: several tokens)
                live[next_seq] = next_seq
                next_seq += 1
            batch = [(seq, int(rng.integers(1, 6)) if step % 3 == 0 else 1) for seq in live]
            rows = {layer: np.concatenate([(np.arange(n)[:, None] * 7 + seq * 31 + step + np.arange(len(h))) % h
                                           for seq, n in batch] or [np.zeros((0, len(h)), np.int64)])
                    for layer, h in heads.items()}
            submitted = {layer: r.copy() for layer, r in rows.items()}
            in_flight.append((submitted, prefetcher.submit(rows)))
            for r in rows.values():
                r[:] = 0                                          # the caller reuses its arrays at once
            if len(in_flight) == 3:                               # keep two steps in flight
                expected, ticket = in_flight.pop(0)
                for layer in (1, 15):
                    got = ticket.wait(layer)
                    want = (expected[layer] + ckpt.head_offsets[layer]).astype(np.float32)
                    assert got.shape == (*want.shape, 64)
                    assert torch.equal(got[..., 0], torch.from_numpy(want))
                    assert torch.equal(got, got[..., :1].expand_as(got))


def test_worker_error_surfaces_in_wait_and_worker_survives(ckpt_factory):
    ckpt = ckpt_factory(dtype="bfloat16")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="mmap", progress=False)
    rows = {1: np.zeros((2, 4), np.int64), 15: np.ones((2, 4), np.int64)}
    with Prefetcher(tables, ckpt.head_offsets) as prefetcher:
        assert prefetcher.submit(rows).wait(15).shape == (2, 4, 64)
        path = ckpt.path / ckpt.tables["15"]["file"]
        os.unlink(path)
        ticket = prefetcher.submit(rows)
        assert ticket.wait(1).shape == (2, 4, 64)  # layer 1's file is still there
        with pytest.raises(PrefetchError, match=f"layer 15.*{path} was deleted"):
            ticket.wait(15)
        assert prefetcher.worker_alive
        assert threading.current_thread() is threading.main_thread()


def test_truncated_while_mapped_is_a_clear_error_not_sigbus(ckpt_factory):
    ckpt = ckpt_factory()
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="mmap", progress=False)
    path = ckpt.path / ckpt.tables["1"]["file"]
    with open(path, "r+b") as f:
        f.truncate(1000)
    for enabled in (True, False):
        with Prefetcher(tables, ckpt.head_offsets, enabled=enabled) as prefetcher:
            ticket = prefetcher.submit({1: np.full((1, 4), 100, np.int64)})
            with pytest.raises(PrefetchError, match=f"{path} changed size while mapped"):
                ticket.wait(1)


def test_wait_time_recorded_and_bad_requests_rejected(ckpt_factory):
    ckpt = ckpt_factory()
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    prefetcher = Prefetcher(tables, ckpt.head_offsets)
    ticket = prefetcher.submit({1: np.zeros((3, 4), np.int64)})
    ticket.wait(1)
    snap = tables.stats.snapshot()
    assert snap[1]["waits"] == 1 and snap[15]["waits"] == 0
    with pytest.raises(KeyError, match="no rows for layer 15"):
        ticket.wait(15)
    with pytest.raises(ValueError, match=r"rows must be \[num_tokens, 4\]"):
        prefetcher.submit({1: np.zeros((3, 5), np.int64)})
    with pytest.raises(ValueError, match="outside its head's size"):
        prefetcher.submit({1: np.full((1, 4), 101, np.int64)})
    prefetcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.submit({1: np.zeros((1, 4), np.int64)})


@pytest.mark.parametrize("enabled", [True, False])
def test_transform_runs_where_the_gather_runs_and_its_errors_surface_in_wait(ckpt_factory, enabled):
    """The Engram layer's token-only half rides on the prefetcher: wait() returns the transform's
    result, computed on the worker (inline without prefetch); a failing transform is a PrefetchError."""
    ckpt = ckpt_factory(row_id_values=True)
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    ran_on = []

    def transform(layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        ran_on.append(threading.current_thread().name)
        if layer_id == 15:
            raise ValueError("projection failed")
        return rows[..., 0].sum(dim=-1)  # [num_tokens]

    rows = {1: np.arange(8, dtype=np.int64).reshape(2, 4), 15: np.zeros((2, 4), np.int64)}
    with Prefetcher(tables, ckpt.head_offsets, enabled=enabled, transform=transform) as prefetcher:
        ticket = prefetcher.submit(rows)
        expected = (rows[1] + ckpt.head_offsets[1]).sum(axis=1).astype(np.float32)
        assert torch.equal(ticket.wait(1), torch.from_numpy(expected))
        with pytest.raises(PrefetchError, match="layer 15.*ValueError: projection failed"):
            ticket.wait(15)
        assert prefetcher.worker_alive == enabled
    assert ran_on == ["engram-prefetch" if enabled else "MainThread"] * 2


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
def test_native_worker_returns_the_python_workers_bits(ckpt_factory, dtype):
    """Tables in RAM: decode-size steps go to the native worker, larger ones to the Python worker;
    gathered rows and their projection come out bit for bit as the Python path makes them, and
    the statistics count both workers' gathers and waits."""
    ckpt = ckpt_factory(dtype=dtype)
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", compute_dtype=torch.bfloat16, progress=False)
    gen = torch.Generator().manual_seed(0)
    weights = {layer: (torch.randn(2 * 8, 4 * 64, generator=gen).bfloat16(), torch.randn(16, generator=gen).bfloat16())
               for layer in (1, 15)}

    def transform(layer_id: int, rows: torch.Tensor) -> torch.Tensor:  # EngramLayer.memory's decode path
        return kernels.small_linear(rows.flatten(1), *weights[layer_id]).unflatten(-1, (2, 8))

    projections = {layer: Projection(*w, (2, 8)) for layer, w in weights.items()}

    rng = np.random.default_rng(0)
    lookups = 0
    for transform_, projections_ in ((None, None), (transform, projections)):
        with Prefetcher(tables, ckpt.head_offsets, transform=transform_, projections=projections_) as prefetcher:
            for tokens, kind in ((1, NativeTicket), (kernels.SMALL_LINEAR_MAX_ROWS, NativeTicket),
                                 (kernels.SMALL_LINEAR_MAX_ROWS + 1, WorkerTicket)):
                rows = {layer: rng.integers(0, 100, (tokens, 4)) for layer in (1, 15)}
                ticket = prefetcher.submit(rows)
                assert type(ticket) is kind
                for layer in (1, 15):
                    gathered = tables[layer].gather(rows[layer] + ckpt.head_offsets[layer]).view(tokens, 4, 64)
                    want = gathered if transform_ is None else transform(layer, gathered)
                    assert torch.equal(ticket.wait(layer), want)
                lookups += tokens * 4 * 2  # the ticket's and the reference gather's
    stats = tables.stats.snapshot()
    assert stats[1]["lookups"] == stats[15]["lookups"] == lookups
    assert stats[1]["waits"] == stats[15]["waits"] == 6


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
def test_native_worker_bad_row_is_a_clear_error_and_later_steps_still_run(ckpt_factory):
    ckpt = ckpt_factory()
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    with Prefetcher(tables, ckpt.head_offsets) as prefetcher:
        num_rows = tables[15].num_rows
        ticket = prefetcher.submit({1: np.zeros((1, 4), np.int64), 15: np.full((1, 4), num_rows, np.int64)},
                                   global_ids=True)
        assert type(ticket) is NativeTicket
        assert ticket.wait(1).shape == (1, 4, 64)
        path = ckpt.path / ckpt.tables["15"]["file"]
        bad_row = rf"layer 15.*row ids must be in \[0, {num_rows}\), got {num_rows} for table {path}"
        with pytest.raises(PrefetchError, match=bad_row):
            ticket.wait(15)
        ticket = prefetcher.submit({1: np.zeros((1, 4), np.int64), 15: np.full((1, 4), num_rows, np.int64)},
                                   global_ids=True)
        with pytest.raises(PrefetchError, match=bad_row):  # wait and the decode kernel in one call: the same error
            ticket.mix(15, torch.zeros(1, 1, 8))
        ticket = prefetcher.submit({1: np.ones((2, 4), np.int64), 15: np.ones((2, 4), np.int64)})
        assert torch.equal(ticket.wait(15)[..., 0], torch.from_numpy(ckpt.values[15][ckpt.head_offsets[15] + 1, 0]
                                                                     .expand(2, 4).numpy()))


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
def test_submit_tokens_hashes_where_the_step_runs_as_the_hasher_does(ckpt_factory):
    """A step given as token ids: decode-size steps are hashed on the native worker, larger ones
    by the hasher in the caller's thread; either way the rows are NgramHasher.step_rows' (layers
    in any config order; rows at the sequence start and right-padded ones included), the
    statistics count them, and a token the hasher rejects is a PrefetchError for that step alone."""
    cfg = EngramConfig(engram_vocab_size=[100, 100], max_ngram_size=3, n_embed_per_ngram=128, n_head_per_ngram=2,
                       layer_ids=[15, 1], pad_id=0)
    vocab = 60
    hasher = NgramHasher(cfg, CompressedTokenizer(np.arange(vocab) % 23))
    ckpt = ckpt_factory(head_sizes={layer: sum(hasher.table_sizes[layer], []) for layer in (1, 15)})
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="host", progress=False)
    rng = np.random.default_rng(0)
    touched = {1: set(), 15: set()}
    steps = [([2 + 1], [1], NativeTicket), ([2 + 1] * 3, [1] * 3, NativeTicket),
             ([1, 2 + 3, 2], [1, 3, 2], NativeTicket),  # two rows at the sequence start, right-padding
             ([2 + 40] * 2, [40] * 2, WorkerTicket)]
    with Prefetcher(tables, ckpt.head_offsets, hasher=hasher) as prefetcher:
        for lengths, new_tokens, kind in steps:
            contexts = [rng.integers(0, vocab, n).tolist() for n in lengths]
            ticket = prefetcher.submit_tokens(contexts, new_tokens)
            assert type(ticket) is kind
            for layer, rows in hasher.step_rows(contexts, new_tokens).items():
                assert rows.shape == (len(contexts) * max(new_tokens), 4)
                assert torch.equal(ticket.wait(layer), tables[layer].gather(rows).view(-1, 4, 64))
                touched[layer].update(rows.reshape(-1).tolist())
            assert ticket.wait(1).shape[0] == len(contexts) * max(new_tokens)  # a second wait: the same
        ticket = prefetcher.submit_tokens([[0, 1, vocab]], [1])
        with pytest.raises(PrefetchError, match=f"layer 1.*token id {vocab} is outside the vocabulary"):
            ticket.wait(1)
        rows = hasher.step_rows([[0, 1, 2]], [1])
        assert torch.equal(prefetcher.submit_tokens([[0, 1, 2]], [1]).wait(15),
                           tables[15].gather(rows[15]).view(1, 4, 64))
        touched[15].update(rows[15].reshape(-1).tolist())
        touched[1].update(rows[1].reshape(-1).tolist())  # gathered by the worker, not waited for
    stats = tables.stats.snapshot()  # the worker has stopped: it counts a layer after handing it over
    for layer in (1, 15):
        assert stats[layer]["rows_touched"] == len(touched[layer])
