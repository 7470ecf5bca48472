"""The Engram backends that fetch a step's rows ahead of the forward (engram_runtime.prefetch and
native_prefetch): every ticket holds its own step's rows, as the hasher and the tables give them,
whatever else is in flight; the native worker hashes, gathers and projects the bits the Python
worker does; errors surface in the waiting thread naming the layer (and the file), and the worker
keeps serving later steps."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

import engram_kernels as kernels
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.engram_runner import EngramRunner
from engram_runtime.engram_step import PrefetchError, ServingWeights, StepTokens
from engram_runtime.hashing import NgramHasher
from engram_runtime.model_runner import Chunk
from engram_runtime.native_prefetch import NativePrefetcher, NativeTicket
from engram_runtime.prefetch import Prefetcher, WorkerTicket
from offload.store import TableSet

VOCAB = 60
LAYERS = (1, 15)
needs_native = pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")


@pytest.fixture
def hasher() -> NgramHasher:
    """Two layers (config order 15, 1: the backends follow the forward's order), orders 2 and 3,
    two 64-dim heads per order: four rows per token and layer."""
    cfg = EngramConfig(engram_vocab_size=[100, 100], max_ngram_size=3, n_embed_per_ngram=128, n_head_per_ngram=2,
                       layer_ids=[15, 1], pad_id=0)
    return NgramHasher(cfg, CompressedTokenizer(np.arange(VOCAB) % 23))


@pytest.fixture
def make_tables(ckpt_factory, hasher):
    """TableSet over a checkpoint sized for `hasher` (row r holds r with row_id_values)."""
    opened = []

    def make(placement="host", cache_rows=0, head_sizes=None, **kw):
        sizes = head_sizes or {layer: sum(hasher.table_sizes[layer], []) for layer in LAYERS}
        ckpt = ckpt_factory(head_sizes=sizes, **kw)
        tables = TableSet.open(ckpt.path, ckpt.tables, placement=placement, cache_rows=cache_rows, progress=False)
        opened.append(tables)
        return ckpt, tables

    yield make
    for tables in opened:
        tables.close()


def identity(layer_id: int, rows: torch.Tensor) -> torch.Tensor:
    return rows


def step_of(contexts: list[list[int]], new_tokens: list[int]) -> StepTokens:
    return StepTokens([list(c) for c in contexts], list(new_tokens), list(range(len(contexts))))


def random_step(rng, batch: int, new: int) -> StepTokens:
    contexts = [rng.integers(0, VOCAB, int(rng.integers(new, new + 3))).tolist() for _ in range(batch)]
    return step_of(contexts, [new] * batch)


def expected_rows(tables, hasher, step: StepTokens, layer: int) -> torch.Tensor:
    rows = hasher.step_rows(step.contexts, step.new_tokens)[layer]
    return tables[layer].gather(rows).view(*rows.shape, -1)


@pytest.mark.parametrize("placement,cache_rows", [("host", 0), ("mmap", 64)])
def test_changing_batch_membership_never_returns_another_steps_rows(make_tables, hasher, placement, cache_rows):
    """Two steps in flight at once, batches of changing size and prefill lengths, the caller's token
    lists emptied right after submit: each ticket's rows are its own step's (row r holds r)."""
    _, tables = make_tables(placement, cache_rows, row_id_values=True)
    rng = np.random.default_rng(0)
    prefetcher = Prefetcher(tables, hasher, identity)
    in_flight = []
    try:
        for i in range(40):
            step = random_step(rng, int(rng.integers(1, 5)), int(rng.integers(1, 6)) if i % 3 == 0 else 1)
            want = {layer: hasher.step_rows(step.contexts, step.new_tokens)[layer] for layer in LAYERS}
            in_flight.append((want, prefetcher.submit(step)))
            for context in step.contexts:
                context.clear()  # the engine's lists move on at once
            if len(in_flight) == 2:
                want, ticket = in_flight.pop(0)
                for layer in LAYERS:
                    got = ticket.memory(layer)
                    assert got.shape == (*want[layer].shape, 64)
                    assert torch.equal(got[..., 0], torch.from_numpy(want[layer]).float())
                    assert torch.equal(got, got[..., :1].expand_as(got))
    finally:
        prefetcher.close()


def test_worker_error_surfaces_in_memory_and_worker_survives(make_tables, hasher):
    ckpt, tables = make_tables("mmap", dtype="bfloat16")
    prefetcher = Prefetcher(tables, hasher, identity)
    step = step_of([[1, 2, 3]], [1])
    assert prefetcher.submit(step).memory(15).shape == (1, 4, 64)
    path = ckpt.path / ckpt.tables["15"]["file"]
    os.unlink(path)
    ticket = prefetcher.submit(step)
    assert ticket.memory(1).shape == (1, 4, 64)  # layer 1's file is still there
    with pytest.raises(PrefetchError, match=f"layer 15.*{path} was deleted"):
        ticket.memory(15)
    assert prefetcher.worker_alive
    assert threading.current_thread() is threading.main_thread()
    prefetcher.close()


@pytest.mark.parametrize("enabled", [True, False])
def test_truncated_while_mapped_is_a_clear_error_not_sigbus(make_tables, hasher, enabled):
    ckpt, tables = make_tables("mmap")
    path = ckpt.path / ckpt.tables["1"]["file"]
    with open(path, "r+b") as f:
        f.truncate(1000)
    prefetcher = Prefetcher(tables, hasher, identity, enabled=enabled)
    with pytest.raises(PrefetchError, match=f"{path} changed size while mapped"):
        prefetcher.submit(step_of([[5, 6]], [1])).memory(1)
    prefetcher.close()


def test_waits_are_recorded_and_bad_requests_rejected(make_tables, hasher):
    _, tables = make_tables()
    prefetcher = Prefetcher(tables, hasher, identity)
    ticket = prefetcher.submit(step_of([[1, 2, 3]], [3]))
    ticket.memory(1)
    snap = tables.stats.snapshot()
    assert snap[1]["waits"] == 1 and snap[15]["waits"] == 0
    with pytest.raises(KeyError, match="no rows for layer 7"):
        ticket.memory(7)
    prefetcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.submit(step_of([[1]], [1]))


@pytest.mark.parametrize("enabled", [True, False])
def test_projection_runs_where_the_gather_runs_and_its_errors_surface(make_tables, hasher, enabled):
    """The layer's token-only half rides on the worker (inline without prefetch): memory() returns
    the projection of the gathered rows; a failing projection is a PrefetchError for its layer."""
    _, tables = make_tables(row_id_values=True)
    ran_on = []

    def project(layer_id: int, rows: torch.Tensor) -> torch.Tensor:
        ran_on.append(threading.current_thread().name)
        if layer_id == 15:
            raise ValueError("projection failed")
        return rows[..., 0].sum(dim=-1)  # [tokens]

    prefetcher = Prefetcher(tables, hasher, project, enabled=enabled)
    step = step_of([[1, 2, 3, 4]], [2])
    ticket = prefetcher.submit(step)
    want = torch.from_numpy(hasher.step_rows(step.contexts, step.new_tokens)[1].sum(axis=1)).float()
    assert torch.equal(ticket.memory(1), want)
    with pytest.raises(PrefetchError, match="layer 15.*ValueError: projection failed"):
        ticket.memory(15)
    assert prefetcher.worker_alive == enabled
    prefetcher.close()
    # the worker serves layers in the forward's order, 1 then 15
    assert ran_on == ["engram-prefetch" if enabled else "MainThread"] * 2


def serving(hasher, dtype=torch.bfloat16, num_slots=4):
    """Layers of hidden size 8 with random weights, their serving weights and conv states."""
    gen = torch.Generator().manual_seed(0)
    layers = {lid: EngramLayer(hasher.cfg, lid, hidden_size=8) for lid in LAYERS}
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    weights = {lid: ServingWeights.of(layer, dtype) for lid, layer in layers.items()}
    states = {lid: layer.new_conv_state(num_slots) for lid, layer in layers.items()}
    return layers, weights, states


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
def test_native_worker_returns_the_python_workers_bits(make_tables, hasher, dtype):
    """The native worker hashes, gathers, decodes and projects a decode-size step bit for bit as the
    Python worker does (the projection's kernel and the table's decode are the same code), and the
    statistics count both workers' gathers and waits."""
    _, tables = make_tables(dtype=dtype)
    _, weights, states = serving(hasher)
    native = NativePrefetcher(tables, hasher)
    native.start(weights, states)
    python = Prefetcher(tables, hasher, lambda lid, rows: weights[lid].project(rows))
    rng = np.random.default_rng(0)
    try:
        for batch in (1, 3, kernels.SMALL_LINEAR_MAX_ROWS):
            step = random_step(rng, batch, 1)
            assert native.takes(step)
            ours, theirs = native.submit(step), python.submit(step)
            assert type(ours) is NativeTicket and type(theirs) is WorkerTicket
            for layer in LAYERS:
                assert torch.equal(ours.memory(layer), theirs.memory(layer))
        assert not native.takes(random_step(rng, kernels.SMALL_LINEAR_MAX_ROWS + 1, 1))
    finally:
        native.close()
        python.close()
    stats = tables.stats.snapshot()
    lookups = 2 * (1 + 3 + kernels.SMALL_LINEAR_MAX_ROWS) * 4  # both workers, four heads per token
    assert stats[1]["lookups"] == stats[15]["lookups"] == lookups
    assert stats[1]["waits"] == stats[15]["waits"] == 6
    assert stats[1]["bytes_gathered"] == lookups * tables[1].header.row_bytes


@needs_native
def test_native_counters_add_to_what_python_records(make_tables, hasher):
    """What the native worker counts (engram_kernels' TableCounters, read at snapshot) adds to what
    the Python side records: counters, bytes at the layer's row size, histograms, the union of
    touched rows; every wait counts, a second one for the same layer too."""
    _, tables = make_tables()
    _, weights, states = serving(hasher)
    native = NativePrefetcher(tables, hasher)
    native.start(weights, states)
    step = step_of([[1, 2, 3], [4, 5]], [1, 1])
    rows = hasher.step_rows(step.contexts, step.new_tokens)
    tables[1].gather(rows[1][:1])
    tables.stats.record_wait(1, 0.5)
    ticket = native.submit(step)
    ticket.memory(1)
    ticket.memory(1)
    ticket.memory(15)
    native.close()
    snap = tables.stats.snapshot()
    assert (snap[1]["lookups"], snap[1]["rows_gathered"]) == (4 + 8, 4 + 8)
    assert snap[1]["bytes_gathered"] == 12 * tables[1].header.row_bytes
    assert snap[1]["rows_touched"] == len(np.unique(rows[1])) and snap[1]["gathers"] == 2
    assert snap[1]["waits"] == 3 and snap[1]["wait_seconds_total"] >= 0.5
    assert snap[1]["wait_seconds_buckets"][-1][1] == 3
    assert (snap[15]["lookups"], snap[15]["gathers"], snap[15]["waits"]) == (8, 1, 1)


@needs_native
def test_native_worker_hashes_as_the_hasher_does(make_tables, hasher):
    """Steps at the sequence start (fewer than N - 1 tokens before the new one) and right-padded
    prefill chunks: the native worker's rows are those of NgramHasher.step_rows, which the Python
    worker uses; a token outside the vocabulary is an error of that step alone."""
    _, tables = make_tables()
    _, weights, states = serving(hasher)
    native = NativePrefetcher(tables, hasher)
    native.start(weights, states)
    python = Prefetcher(tables, hasher, lambda lid, rows: weights[lid].project(rows), enabled=False)
    steps = [step_of([[3]], [1]), step_of([[3, 4, 5]] * 3, [1] * 3), step_of([[1], [7, 8, 9, 10], [2, 3]], [1, 3, 2])]
    try:
        for step in steps:
            ours, theirs = native.submit(step), python.submit(step)
            for layer in LAYERS:
                assert ours.memory(layer).shape == (len(step.contexts) * max(step.new_tokens), 2, 8)
                assert torch.equal(ours.memory(layer), theirs.memory(layer))
        bad = native.submit(step_of([[0, 1, VOCAB]], [1]))
        with pytest.raises(PrefetchError, match=f"layer 1.*token id {VOCAB} is outside the vocabulary"):
            bad.memory(1)
        assert native.submit(step_of([[0, 1, 2]], [1])).memory(15).shape == (1, 2, 8)
    finally:
        native.close()
        python.close()


@needs_native
def test_native_bad_row_is_a_clear_error_and_later_steps_still_run(make_tables, hasher):
    """A table smaller than the hasher's rows (a checkpoint that does not match its config): the
    wait and the one-call decode mix both raise a PrefetchError naming the layer and the file."""
    small = {1: sum(hasher.table_sizes[1], []), 15: [3, 3, 3, 3]}
    ckpt, tables = make_tables(head_sizes=small)
    native = NativePrefetcher(tables, hasher)
    _, weights, states = serving(hasher)
    native.start(weights, states)
    path = ckpt.path / ckpt.tables["15"]["file"]
    bad_row = rf"layer 15.*row ids must be in \[0, 12\), got \d+ for table {path}"
    try:
        ticket = native.submit(step_of([[4, 5, 6]], [1]))
        assert ticket.memory(1).shape == (1, 2, 8)
        with pytest.raises(PrefetchError, match=bad_row):
            ticket.memory(15)
        with pytest.raises(PrefetchError, match=bad_row):
            native.submit(step_of([[4, 5, 6]], [1])).mix(15, torch.zeros(1, 1, 8))
        assert native.submit(step_of([[1, 2]], [1])).memory(1).shape == (1, 2, 8)
    finally:
        native.close()


@needs_native
@pytest.mark.parametrize("threads, cpus, ahead", [(1, 2, True), (2, 2, False)])
def test_cpu_rows_are_fetched_ahead_only_with_a_core_left_for_the_worker(make_tables, hasher, monkeypatch,
                                                                        threads, cpus, ahead):
    """A prefetch thread beside compute threads on every core deschedules one of them, and every
    parallel op waits for it: by default the rows are then fetched inline, by the compute threads."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    _, tables = make_tables(placement="host")
    runner = EngramRunner(serving(hasher, torch.float32)[0], hasher, tables, num_slots=4, dtype=torch.float32)
    try:
        assert [type(b) for b in runner.backends] == ([NativePrefetcher, Prefetcher] if ahead else [Prefetcher])
        assert runner.backends[-1].enabled is ahead
    finally:
        runner.close()


@needs_native
def test_runner_sends_decode_steps_to_the_native_worker_and_prefill_to_python(make_tables, hasher):
    """EngramRunner picks the backend per step: decode-size steps over CPU tables without a cache go
    to the native worker, longer steps (and any step when the tables sit behind a cache) to the
    Python worker; a new sequence's conv state starts from zeros."""
    layers = serving(hasher, torch.float32)[0]
    for cache_rows, native in ((0, True), (64, False)):
        _, tables = make_tables(cache_rows=cache_rows, placement="host")
        runner = EngramRunner(layers, hasher, tables, num_slots=4, dtype=torch.float32, prefetch=True)
        try:
            runner.conv_states[1][2] = 1.0
            prompt = [t % VOCAB for t in range(kernels.SMALL_LINEAR_MAX_ROWS + 1)]
            step = runner.submit([Chunk(2, prompt, 0)], [prompt])
            assert type(step.ticket) is WorkerTicket
            assert runner.conv_states[1][2].abs().sum() == 0
            step = runner.submit([Chunk(2, [8], len(prompt))], [prompt + [8]])
            assert type(step.ticket) is (NativeTicket if native else WorkerTicket)
        finally:
            runner.close()
