"""EngramLayer reproduces the reference forward, and incremental decoding equals a full forward."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engram_runtime.engram import EngramLayer
from engram_runtime.engram_config import EngramConfig
from engram_runtime.engram_step import ServingWeights

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "engram_forward.safetensors"


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    sd = load_file(str(GOLDEN))
    cfg = EngramConfig(engram_vocab_size=[2, 2], max_ngram_size=meta["max_ngram_size"],
                       n_embed_per_ngram=meta["n_embed_per_ngram"], n_head_per_ngram=meta["n_head_per_ngram"],
                       layer_ids=[0], kernel_size=meta["kernel_size"], hc_mult=meta["hc_mult"])
    layer = EngramLayer(cfg, 0, meta["hidden_size"], meta["hc_mult"])
    layer.load_reference_state_dict({k: v for k, v in sd.items() if not k.startswith("__")})
    table, offsets = sd["multi_head_embedding.embedding.weight"], sd["multi_head_embedding.offsets"]
    assert offsets.tolist() == [0] + torch.tensor(meta["table_rows_per_head"]).cumsum(0)[:-1].tolist()
    emb = table[sd["__input_hash_ids"] + offsets]  # the gather offload/ performs
    return layer, sd["__input_hidden_states"], emb, sd["__expected_output"]


@torch.no_grad()
def test_forward_matches_reference(golden):
    layer, hidden, emb, expected = golden
    out = layer(hidden, emb)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-5
    b, t, hc, _ = hidden.shape
    assert layer.last_gate.shape == (b, t, hc)
    assert ((layer.last_gate > 0) & (layer.last_gate < 1)).all()


@torch.no_grad()
@pytest.mark.parametrize("prefill", [0, 1, 7])
def test_prefill_then_decode_equals_full_forward(golden, prefill):
    layer, hidden, emb, _ = golden
    full = layer(hidden, emb)
    full_gate = layer.last_gate
    state = layer.new_conv_state(hidden.shape[0])
    assert state.shape == (hidden.shape[0], (4 - 1) * 3, 2 * 48)
    outs, gates = [], []
    if prefill:
        outs.append(layer(hidden[:, :prefill], emb[:, :prefill], state))
        gates.append(layer.last_gate)
    for t in range(prefill, hidden.shape[1]):
        outs.append(layer(hidden[:, t: t + 1], emb[:, t: t + 1], state))
        gates.append(layer.last_gate)
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5
    assert (torch.cat(gates, 1) - full_gate).abs().max().item() <= 1e-6


@torch.no_grad()
def test_conv_state_holds_the_newest_inputs_in_place():
    cfg = EngramConfig(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[2])
    torch.manual_seed(0)
    layer = EngramLayer(cfg, 2, hidden_size=24)
    torch.nn.init.normal_(layer.value_proj.weight)
    hidden = torch.randn(3, 20, 1, 24)
    emb = torch.randn(3, 20, cfg.heads_total, cfg.head_dim)
    full = layer(hidden, emb)
    state = layer.new_conv_state(3)
    ptr = state.data_ptr()
    chunks = [(0, 5), (5, 6), (6, 13), (13, 14), (14, 20)]  # mixed chunk sizes, some shorter than the state
    outs = [layer(hidden[:, a:b], emb[:, a:b], state) for a, b in chunks]
    assert state.data_ptr() == ptr and state.abs().sum() > 0
    assert (torch.cat(outs, 1) - full).abs().max().item() <= 1e-5
    # sequences in a batch do not see each other: row 1 alone gives the same output
    alone = layer(hidden[1:2], emb[1:2])
    assert (alone - full[1:2]).abs().max().item() <= 1e-6


@torch.no_grad()
def test_right_padded_batch_with_lengths_keeps_each_rows_state():
    cfg = EngramConfig(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    torch.manual_seed(1)
    layer = EngramLayer(cfg, 1, hidden_size=24)
    torch.nn.init.normal_(layer.value_proj.weight)
    hidden = torch.randn(3, 16, 1, 24)
    emb = torch.randn(3, 16, cfg.heads_total, cfg.head_dim)
    full = layer(hidden, emb)
    lengths = torch.tensor([6, 1, 12])  # a padded prefill batch of different prompt lengths
    state = layer.new_conv_state(3)
    first = layer(hidden[:, :12], emb[:, :12], state, lengths)
    for b, n in enumerate(lengths.tolist()):
        assert (first[b, :n] - full[b, :n]).abs().max().item() <= 1e-5
    # next step: each row continues from its own last valid token
    nxt = torch.stack([hidden[b, n] for b, n in enumerate(lengths.tolist())])[:, None]
    nxt_emb = torch.stack([emb[b, n] for b, n in enumerate(lengths.tolist())])[:, None]
    out = layer(nxt, nxt_emb, state)
    for b, n in enumerate(lengths.tolist()):
        assert (out[b, 0] - full[b, n]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_per_slot_conv_store_equals_one_state_per_sequence():
    """mix() with the engine's per-slot store and a batch's slots reads and writes only those
    slots, and each row continues exactly as with a state of its own."""
    cfg = EngramConfig(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    torch.manual_seed(2)
    layer = EngramLayer(cfg, 1, hidden_size=24)
    torch.nn.init.normal_(layer.value_proj.weight)
    hidden = torch.randn(2, 6, 1, 24)
    memory = layer.memory(torch.randn(2, 6, cfg.heads_total, cfg.head_dim))
    store, own = layer.new_conv_state(4), [layer.new_conv_state(1) for _ in range(2)]
    slots = torch.tensor([3, 1])
    for t in range(6):
        out = layer.mix(hidden[:, t:t + 1], memory[:, t:t + 1], store, slots=slots)
        for b in range(2):
            alone = layer.mix(hidden[b:b + 1, t:t + 1], memory[b:b + 1, t:t + 1], own[b])
            assert (out[b:b + 1] - alone).abs().max().item() <= 1e-6
    assert torch.allclose(store[slots], torch.cat(own), atol=1e-6) and store[[0, 2]].abs().sum() == 0


def test_zero_value_projection_gives_zero_output():
    cfg = EngramConfig(engram_vocab_size=[11, 11], n_embed_per_ngram=16, n_head_per_ngram=2, layer_ids=[1])
    layer = EngramLayer(cfg, 1, hidden_size=24)
    torch.nn.init.zeros_(layer.value_proj.weight)
    torch.nn.init.zeros_(layer.value_proj.bias)
    out = layer(torch.randn(2, 5, 1, 24), torch.randn(2, 5, cfg.heads_total, cfg.head_dim))
    assert out.abs().max().item() == 0.0


def test_bad_shapes_and_state_dicts_are_refused(golden):
    layer, hidden, emb, _ = golden
    with pytest.raises(ValueError, match="embeddings"):
        layer(hidden, emb[:, :, :4])
    with pytest.raises(ValueError, match="conv_state"):
        layer(hidden, emb, torch.zeros(2, 3, 96))
    sd = layer.state_dict()
    with pytest.raises(ValueError, match="missing.*value_proj.bias"):
        layer.load_reference_state_dict({k: v for k, v in sd.items() if k != "value_proj.bias"})
    with pytest.raises(ValueError, match="norm1.0.weight"):
        layer.load_reference_state_dict({**sd, "norm1.0.weight": torch.ones(7)})
    with pytest.raises(ValueError, match="not in EngramConfig.layer_ids"):
        EngramLayer(layer.cfg, 5, 48)


def test_config_round_trip_and_validation():
    cfg = EngramConfig(engram_vocab_size=[100, 200], layer_ids=[1, 15])
    assert EngramConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.head_dim, cfg.heads_total, cfg.engram_dim, cfg.conv_state_len) == (64, 16, 1024, 9)
    with pytest.raises(ValueError, match="unknown field"):
        EngramConfig.from_dict({**cfg.to_dict(), "n_heads": 3})
    with pytest.raises(ValueError, match="engram_vocab_size"):
        EngramConfig(engram_vocab_size=[100])
    with pytest.raises(ValueError, match="divisible"):
        EngramConfig(engram_vocab_size=[100, 100], n_embed_per_ngram=100, n_head_per_ngram=8)


@torch.no_grad()
def test_serving_weights_fuse_projections_with_the_same_output(golden):
    """Serving fuses key and value projections into one matmul in the backbone's dtype and keeps
    the mix weights: float32 gives the reference output, bfloat16 stays close."""
    layer, hidden, emb, expected = golden
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 0.02 * expected.abs().max().item())):
        weights = ServingWeights.of(layer, dtype)
        assert weights.projection.weight.dtype == dtype
        memory = weights.project(emb.flatten(0, 1)).unflatten(0, emb.shape[:2])
        assert (layer.mix(hidden, memory, weights=weights.mix) - expected).abs().max().item() <= tolerance
