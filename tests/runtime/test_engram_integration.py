"""The backbone with Engram memory: a fresh checkpoint changes nothing; with trained-like
(random) value weights, batched, chunked, incremental and full-sequence logits agree."""
from __future__ import annotations

import pytest
import torch

import engram_kernels as kernels
from engram_runtime.checkpoint import default_config, init_checkpoint
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.llm import LLM
from engram_runtime.model_runner import Chunk
from engram_runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def engram_dir(tmp_path_factory, loaded_model):
    c = loaded_model.config
    backbone = {"name": c.name, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                "vocab_size": c.vocab_size}
    path = tmp_path_factory.mktemp("engram") / "ckpt"
    init_checkpoint(path, default_config(c.vocab_size, rows_per_head=3001), backbone, dtype="float32",
                    progress=False)
    return str(path)


@pytest.fixture(scope="module")
def engine(engram_dir, loaded_model):
    # dense weights, as the `runner` it is compared with (the file's blocks round differently)
    eng = LLMEngine(EngineConfig(engram=engram_dir, max_num_seqs=4, max_model_len=128, quantization="none"),
                    loaded_model)
    yield eng
    eng.shutdown()


def logits(engine, ids_per_row, rows, all_logits=False):
    return engine.runner.forward(rows, engine.engram.submit(rows, ids_per_row), all_logits=all_logits)


def test_fresh_checkpoint_gives_backbone_logits(engine, runner, prompt_ids):
    assert engine.engram_layer_ids == [1, 15]
    for ids in prompt_ids:
        with_memory = logits(engine, [ids], [Chunk(0, ids, 0)], all_logits=True)
        backbone = runner.forward([Chunk(0, ids, 0)], all_logits=True)
        assert (with_memory - backbone).abs().max().item() <= 1e-6


@pytest.fixture(scope="module")
def random_values(engine):
    gen = torch.Generator().manual_seed(0)
    for layer in engine.engram.layers.values():
        w = layer.value_proj.weight
        w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    engine.engram.prepare()  # re-pack the projections this changed, for both prefetch workers
    return engine


def test_random_values_full_incremental_and_batched_agree(random_values, runner, prompt_ids):
    engine = random_values
    a, b = prompt_ids[3][:30], prompt_ids[2][:13]
    full_a = logits(engine, [a], [Chunk(0, a, 0)], all_logits=True)[0]
    backbone = runner.forward([Chunk(0, a, 0)], all_logits=True)[0]
    assert (full_a - backbone).abs().max().item() > 0.1  # the memory is really in the residual

    # prefill 6 tokens, then one token at a time
    inc = [logits(engine, [a], [Chunk(1, a[:6], 0)], all_logits=True)[0]]
    inc += [logits(engine, [a], [Chunk(1, [t], i)]) for i, t in enumerate(a[6:], start=6)]
    assert (torch.cat(inc) - full_a).abs().max().item() <= 1e-4

    # a right-padded batch (prefill of b beside a chunk of a), then decoding both together
    logits(engine, [a], [Chunk(2, a[:10], 0)])
    mixed = logits(engine, [a, b], [Chunk(2, a[10:20], 10), Chunk(3, b[:7], 0)])
    assert (mixed[0] - full_a[19]).abs().max().item() <= 1e-4
    full_b = logits(engine, [b], [Chunk(0, b, 0)], all_logits=True)[0]
    assert (mixed[1] - full_b[6]).abs().max().item() <= 1e-4
    for i in range(6):
        step = logits(engine, [a, b], [Chunk(2, [a[20 + i]], 20 + i), Chunk(3, [b[7 + i]], 7 + i)])
        assert (step[0] - full_a[20 + i]).abs().max().item() <= 1e-4
        assert (step[1] - full_b[7 + i]).abs().max().item() <= 1e-4


def test_decode_steps_on_the_kernels_equal_the_torch_path(random_values, prompt_ids, monkeypatch):
    """A decode step through EngramLayer.decode_step (the hook's path on the native kernels)
    gives the logits and per-row gates of mix() on torch ops."""
    engine = random_values
    a, b = prompt_ids[3][:8], prompt_ids[2][:5]
    runs = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(kernels, "available", lambda: False)
        logits(engine, [a, b], [Chunk(2, a[:7], 0), Chunk(3, b[:4], 0)])  # fresh conv states
        rows = [Chunk(2, [a[7]], 7), Chunk(3, [b[4]], 4)]
        hook = engine.engram.submit(rows, [a, b])
        runs.append((engine.runner.forward(rows, hook), hook.gates([0, 1])))
    (got, got_gates), (want, want_gates) = runs
    assert (got - want).abs().max().item() <= 1e-4
    assert len(got_gates) == len(want_gates) == 2 and len(got_gates[0]) == 2  # rows, layers 1 and 15
    assert max(abs(g - w) for gr, wr in zip(got_gates, want_gates) for g, w in zip(gr, wr)) <= 1e-5


def test_engram_engine_batches_like_alone_and_reports_gates(engram_dir, loaded_model, prompt_ids):
    llm = LLM(engram=engram_dir, loaded=loaded_model, max_num_seqs=4, max_model_len=128, max_num_batched_tokens=16)
    for layer in llm.engine.engram.layers.values():
        torch.nn.init.normal_(layer.value_proj.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, engram_gates=True)
    batch = llm.generate(prompt_ids, params)
    for ids, out in zip(prompt_ids, batch):
        assert llm.generate([ids], params)[0].token_ids == out.token_ids
    gates = batch[0].gates
    assert len(gates) == 10 and set(gates[0]) == {1, 15}
    assert all(0.0 < g < 1.0 for step in gates for g in step.values())
    stats = llm.engine.table_stats.snapshot()
    assert stats  # lookups were counted by the offload store
    llm.engine.shutdown()
