"""DeviceHasher gives NgramHasher's row ids bit for bit, and its CUDA form traces under fake CUDA.

On CPU tensors: the golden vectors, batches against NgramHasher.hash / step_rows, decoding
token by token against one pass, chunked prefill with right padding, slot reuse. Under
FakeTensorMode on "cuda": a whole step (reset, rows, advance) runs with every tensor on the
fake device, which fails on a CPU tensor mixed in or a host sync (both shown to fail).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorDeviceMismatchError, FakeTensorMode

from engram_kernels.triton_gather import gather_rows
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.device_hashing import DeviceHasher
from engram_runtime.engram_config import EngramConfig
from engram_runtime.hashing import NgramHasher


@pytest.fixture(scope="module")
def hasher(compressed, golden_hash):
    return NgramHasher(EngramConfig(**golden_hash["config"]), compressed)


@pytest.fixture(scope="module")
def hasher4():
    """A 4-gram hasher over a small made-up vocabulary (no tokenizer needed): orders 2..4."""
    lookup = np.random.default_rng(0).integers(0, 700, size=1000)
    cfg = EngramConfig(engram_vocab_size=[5003, 4001, 3001], max_ngram_size=4, n_head_per_ngram=3,
                       n_embed_per_ngram=48, layer_ids=[0, 2, 5], pad_id=7)
    return NgramHasher(cfg, CompressedTokenizer(lookup))


def longs(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=torch.int64)


def full_rows(hasher: NgramHasher, ids: np.ndarray) -> np.ndarray:
    """NgramHasher.hash with global ids, stacked: [L, B, T, heads_total]."""
    hashed = hasher.hash(ids, global_ids=True)
    return np.stack([hashed[lid] for lid in hasher.cfg.layer_ids])


def test_golden_vectors(hasher, golden_hash):
    for case in golden_hash["cases"]:
        ids = case["token_ids"]
        got = DeviceHasher(hasher, num_slots=2).rows(longs([1]), longs([ids])).numpy()
        for i, lid in enumerate(hasher.cfg.layer_ids):
            assert got.dtype == np.int64 and got.shape == (2, len(ids), 16)
            np.testing.assert_array_equal(got[i] - hasher.head_offsets[lid], case["hash_ids"][str(lid)])


@pytest.mark.parametrize("which", ["hasher", "hasher4"])
def test_a_batch_equals_ngram_hasher(which, request):
    hasher = request.getfixturevalue(which)
    ids = np.random.default_rng(1).integers(0, hasher.ct.vocab_size, size=(4, 13))
    got = DeviceHasher(hasher, num_slots=6).rows(longs([5, 0, 3, 1]), longs(ids))
    np.testing.assert_array_equal(got.view(len(hasher.cfg.layer_ids), 4, 13, -1).numpy(), full_rows(hasher, ids))


@pytest.mark.parametrize("which", ["hasher", "hasher4"])
def test_decoding_token_by_token_equals_one_pass(which, request):
    hasher = request.getfixturevalue(which)
    ids = np.random.default_rng(2).integers(0, hasher.ct.vocab_size, size=(3, 9))
    device_hasher = DeviceHasher(hasher, num_slots=3)
    slots = longs([2, 0, 1])
    steps = [device_hasher.step(slots, longs(ids[:, t: t + 1])).numpy() for t in range(ids.shape[1])]
    np.testing.assert_array_equal(np.stack(steps, axis=2), full_rows(hasher, ids))


@pytest.mark.parametrize("which", ["hasher", "hasher4"])
def test_chunked_prefill_with_right_padding(which, request):
    """Each step is a right-padded batch of chunks (lengths, 0 for a row not in the step); the
    padding holds an id past the vocabulary, which no lookup may read and no history keep.
    rows() equals step_rows' ids of the same chunks; the chunks together equal one pass."""
    hasher = request.getfixturevalue(which)
    rng = np.random.default_rng(3)
    seqs = rng.integers(0, hasher.ct.vocab_size, size=(3, 12))
    plan = [[5, 1, 0], [0, 4, 6], [7, 1, 3], [0, 6, 3]]  # new tokens per row per step; sums to 12
    device_hasher, slots = DeviceHasher(hasher, num_slots=4), longs([3, 1, 0])
    done, got, before = [0, 0, 0], [[], [], []], hasher.cfg.max_ngram_size - 1
    heads = hasher.cfg.heads_total
    for lengths in plan:
        width = max(lengths)
        batch = np.full((3, width), hasher.ct.vocab_size + 5)
        for b, n in enumerate(lengths):
            batch[b, :n] = seqs[b, done[b]: done[b] + n]
        rows = device_hasher.rows(slots, longs(batch), longs(lengths)).numpy().reshape(-1, 3, width, heads)
        contexts = [seqs[b, max(0, done[b] - before): done[b] + n].tolist() for b, n in enumerate(lengths)]
        reference = hasher.step_rows(contexts, lengths)
        reference = np.stack([reference[lid] for lid in hasher.cfg.layer_ids]).reshape(-1, 3, width, heads)
        for b, n in enumerate(lengths):
            np.testing.assert_array_equal(rows[:, b, :n], reference[:, b, :n])
            got[b].append(rows[:, b, :n])
        device_hasher.advance(slots, longs(batch), longs(lengths))
        done = [d + n for d, n in zip(done, lengths)]
    full = full_rows(hasher, seqs)
    for b in range(3):
        np.testing.assert_array_equal(np.concatenate(got[b], axis=1), full[:, b])


def test_reset_slots_start_new_sequences(hasher):
    rng = np.random.default_rng(4)
    first, second, other = (rng.integers(0, hasher.ct.vocab_size, size=(1, 7)) for _ in range(3))
    device_hasher = DeviceHasher(hasher, num_slots=2)
    device_hasher.advance(longs([0]), longs(first))
    device_hasher.advance(longs([1]), longs(other))
    device_hasher.reset(longs([0]))
    got = device_hasher.step(longs([0]), longs(second[:, :4]))
    got = torch.cat([got, device_hasher.rows(longs([0]), longs(second[:, 4:]))], dim=1)
    np.testing.assert_array_equal(got.numpy(), full_rows(hasher, second)[:, 0])
    # slot 1 kept its own history through slot 0's reset
    tail = rng.integers(0, hasher.ct.vocab_size, size=(1, 3))
    np.testing.assert_array_equal(device_hasher.rows(longs([1]), longs(tail)).numpy(),
                                  full_rows(hasher, np.concatenate([other, tail], axis=1))[:, 0, 7:])


def fake_cuda(device_hasher: DeviceHasher, keep_on_cpu: str | None = None) -> DeviceHasher:
    """The hasher's tensors as fake CUDA tensors (call inside the FakeTensorMode); with
    keep_on_cpu one of them stays a (fake) CPU tensor, the mistake the trace must catch."""
    for name, value in vars(device_hasher).items():
        if isinstance(value, torch.Tensor):
            device = "cpu" if name == keep_on_cpu else "cuda"
            setattr(device_hasher, name, torch.empty_like(value, device=device))
    return device_hasher


def fake_step(hasher: NgramHasher, keep_on_cpu: str | None = None, sync: bool = False) -> torch.Tensor:
    """A prefill and a decode step traced on fake CUDA: reset, rows, advance, step."""
    with FakeTensorMode():
        device_hasher = fake_cuda(DeviceHasher(hasher, num_slots=8), keep_on_cpu)
        slots = torch.empty(4, dtype=torch.int64, device="cuda")
        prompt = torch.empty(4, 16, dtype=torch.int64, device="cuda")
        lengths = torch.empty(4, dtype=torch.int64, device="cuda")
        device_hasher.reset(slots)
        rows = device_hasher.rows(slots, prompt, lengths)
        device_hasher.advance(slots, prompt, lengths)
        if sync:
            rows.max().item()
        decode = device_hasher.step(slots, torch.empty(4, 1, dtype=torch.int64, device="cuda"))
        assert device_hasher.history.device.type == "cuda"
        return rows, decode


def test_a_step_traces_on_fake_cuda(hasher):
    rows, decode = fake_step(hasher)
    heads = hasher.cfg.heads_total
    assert rows.device.type == "cuda" and rows.dtype == torch.int64 and rows.shape == (2, 4 * 16, heads)
    assert decode.device.type == "cuda" and decode.shape == (2, 4, heads)


@pytest.mark.parametrize("name", ["lookup", "multipliers", "primes", "offsets", "history"])
def test_the_fake_cuda_trace_catches_a_cpu_tensor(hasher, name):
    with pytest.raises(FakeTensorDeviceMismatchError):
        fake_step(hasher, keep_on_cpu=name)


def test_the_fake_cuda_trace_catches_a_host_sync(hasher):
    with pytest.raises(DataDependentOutputException):
        fake_step(hasher, sync=True)


def test_the_rows_feed_the_gather_on_fake_cuda(hasher4):
    """Hash on the device, then gather each layer's rows from its (fake CUDA, e.g. UVA) table: no
    host hop between the two, so a decode step's Engram reads can sit in one CUDA graph."""
    with FakeTensorMode():
        device_hasher = fake_cuda(DeviceHasher(hasher4, num_slots=4))
        rows = device_hasher.step(torch.empty(4, dtype=torch.int64, device="cuda"),
                                  torch.empty(4, 1, dtype=torch.int64, device="cuda"))
        for i, lid in enumerate(hasher4.cfg.layer_ids):
            table = torch.empty(hasher4.num_rows[lid], 64 + 2, dtype=torch.uint8, device="cuda")
            got = gather_rows(table, rows.select(0, i).reshape(-1), "fp8_e4m3", torch.bfloat16)
            assert got.device.type == "cuda" and got.shape == (4 * hasher4.cfg.heads_total, 64)
