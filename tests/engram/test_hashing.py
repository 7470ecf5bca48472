"""Compression and N-gram hashing must equal DeepSeek's reference bit for bit (golden vectors)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

import engram_kernels as kernels
from engram_runtime.engram_config import EngramConfig
from engram_runtime.hashing import NgramHasher, head_offsets_for, is_prime, table_sizes_for


@pytest.fixture(params=["native", "numpy"], autouse=True)
def implementation(request, monkeypatch):
    """Every test runs on both implementations of NgramHasher.hash: the native kernel and numpy."""
    if request.param == "numpy":
        monkeypatch.setattr(kernels, "available", lambda: False)
    else:
        assert kernels.available(), "the native kernels did not build"


@pytest.fixture(scope="module")
def hasher(compressed, golden_hash):
    return NgramHasher(EngramConfig(**golden_hash["config"]), compressed)


def test_compressed_vocabulary_matches_reference(compressed, golden_hash):
    assert compressed.vocab_size == golden_hash["vocab_size"]
    assert len(compressed) == golden_hash["compressed_vocab_size"]
    assert compressed.lookup_table[:64].tolist() == golden_hash["lookup_first_64"]
    digest = hashlib.sha256(compressed.lookup_table.astype("<i8").tobytes()).hexdigest()
    assert digest == golden_hash["lookup_sha256_int64le"]


def test_multipliers_and_primes_match_reference(hasher, golden_hash):
    for lid in golden_hash["config"]["layer_ids"]:
        assert hasher.multipliers[lid].dtype == np.int64
        assert hasher.multipliers[lid].tolist() == golden_hash["multipliers"][str(lid)]
        assert hasher.table_sizes[lid] == golden_hash["primes"][str(lid)]


def test_hash_ids_match_reference(hasher, tokenizer, golden_hash):
    for case in golden_hash["cases"]:
        assert tokenizer.encode(case["text"], add_special_tokens=False) == case["token_ids"]
        assert hasher.ct(case["token_ids"]).tolist() == case["compressed_ids"]
        rows = hasher.hash(np.array([case["token_ids"]]))
        for lid in golden_hash["config"]["layer_ids"]:
            assert rows[lid].dtype == np.int64 and rows[lid].shape == (1, len(case["token_ids"]), 16)
            assert rows[lid][0].tolist() == case["hash_ids"][str(lid)]


def test_batched_hash_equals_each_row_alone(hasher, golden_hash):
    cases = golden_hash["cases"]
    t = min(len(c["token_ids"]) for c in cases)
    batch = np.array([c["token_ids"][:t] for c in cases])
    rows = hasher.hash(batch)
    for b, case in enumerate(cases):
        for lid in hasher.cfg.layer_ids:
            assert rows[lid][b].tolist() == case["hash_ids"][str(lid)][:t]


def test_last_window_position_equals_full_hash_at_every_position(hasher):
    """A decode step hashes only each sequence's newest N tokens, left-padded with raw pad_id at
    the sequence start (NgramHasher.step_rows): its last position must equal the full hash."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, hasher.ct.vocab_size, size=(3, 12))
    full = hasher.hash(ids)
    n, pad = hasher.cfg.max_ngram_size, hasher.cfg.pad_id
    padded = np.concatenate([np.full((3, n - 1), pad), ids], axis=1)
    for t in range(ids.shape[1]):
        step = hasher.hash(padded[:, t: t + n])
        for lid in hasher.cfg.layer_ids:
            assert step[lid].shape == (3, n, hasher.cfg.heads_total)
            np.testing.assert_array_equal(step[lid][:, -1], full[lid][:, t])


def test_step_rows_of_chunks_equal_the_full_hash(hasher):
    """The engine's per-step rows (NgramHasher.step_rows): any chunk of a sequence, with up to N-1
    tokens before it, hashes like the whole sequence; rows of a batch are right-padded."""
    ids = np.random.default_rng(4).integers(0, hasher.ct.vocab_size, size=12).tolist()
    full = hasher.hash(np.array([ids]), global_ids=True)
    before = hasher.cfg.max_ngram_size - 1
    chunks = [(0, 5), (5, 6), (1, 2), (6, 12)]
    rows = hasher.step_rows([ids[max(0, s - before) : e] for s, e in chunks], [e - s for s, e in chunks])
    for lid in hasher.cfg.layer_ids:
        got = rows[lid].reshape(len(chunks), 6, -1)
        for b, (s, e) in enumerate(chunks):
            np.testing.assert_array_equal(got[b, : e - s], full[lid][0, s:e])


def test_context_positions_and_global_ids(hasher):
    """context drops the leading positions' rows (the engine's N-1 tokens of history) and
    global_ids adds each head's offset: the row in the layer's whole table."""
    ids = np.random.default_rng(3).integers(0, hasher.ct.vocab_size, size=(2, 9))
    full = hasher.hash(ids)
    got = hasher.hash(ids, context=4, global_ids=True)
    for lid in hasher.cfg.layer_ids:
        np.testing.assert_array_equal(got[lid], full[lid][:, 4:] + hasher.head_offsets[lid])
    with pytest.raises(ValueError, match="context"):
        hasher.hash(ids, context=10)


def test_rows_stay_inside_their_heads(hasher):
    rng = np.random.default_rng(2)
    rows = hasher.hash(rng.integers(0, hasher.ct.vocab_size, size=(4, 64)))
    for lid in hasher.cfg.layer_ids:
        primes = np.array(hasher.table_sizes[lid]).reshape(-1)
        assert (rows[lid] >= 0).all() and (rows[lid] < primes).all()
        offsets = hasher.head_offsets[lid]
        assert offsets.dtype == np.int64 and offsets[0] == 0
        np.testing.assert_array_equal(np.diff(offsets), primes[:-1])
        assert hasher.num_rows[lid] == int(primes.sum()) == int(offsets[-1] + primes[-1])


def test_primes_are_distinct_primes_above_the_start():
    cfg = EngramConfig(engram_vocab_size=[50, 40], n_head_per_ngram=4, n_embed_per_ngram=16, layer_ids=[0, 3])
    sizes = table_sizes_for(cfg)
    flat = [p for lid in cfg.layer_ids for heads in sizes[lid] for p in heads]
    assert len(set(flat)) == len(flat)
    sieve = [n for n in range(2, 200) if all(n % d for d in range(2, int(n ** 0.5) + 1))]
    assert sizes[0][0] == [53, 59, 61, 67]  # searched upward from 50
    assert all(p in sieve for p in flat) and all(p >= 40 for p in flat)
    assert [is_prime(n) for n in range(200)] == [n in sieve for n in range(200)]
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**61 - 1))
    assert head_offsets_for([[3, 5], [7]]).tolist() == [0, 3, 8]


def test_bad_inputs_are_refused(hasher):
    with pytest.raises(ValueError, match="shape"):
        hasher.hash(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        hasher.hash(np.array([[1, hasher.ct.vocab_size]]))
