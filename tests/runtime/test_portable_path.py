"""The GPU's code, run on CPU tensors (offload.device.ComputeDevice.portable_cpu): torch ops only,
no native kernels and no oneDNN packing, decode inputs built by device ops, Engram rows hashed,
gathered and projected by the device backend on a stand-in side stream, decode steps replayed
from stand-in graphs. It gives the native CPU path's greedy text, batched as alone, for every
table placement and dtype; a slow side stream stalls the forward at the Engram layer, not before.
"""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engram_runtime.checkpoint_init import InitOptions, engram_init
from engram_runtime.cuda_graphs import DecodeGraphs, capture_sizes
from engram_runtime.device_engram import DeviceEngram
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.llm import LLM
from engram_runtime.prefetch import Prefetcher
from engram_runtime.sampling import SamplingParams
from offload.device import ComputeDevice

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def portable_llm(loaded_model, **kwargs) -> LLM:
    config = EngineConfig(max_num_seqs=4, max_model_len=128, **kwargs)
    return LLM(engine=LLMEngine(config, loaded_model, device=ComputeDevice.portable_cpu()))


def test_backbone_gives_the_native_paths_text_batched_as_alone(loaded_model, prompt_ids):
    native = LLM(loaded=loaded_model, max_num_seqs=4, max_model_len=128)
    portable = portable_llm(loaded_model)
    assert not portable.engine.runner.fused_decode and portable.engine.runner.model.output.packed is None
    batch = portable.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in batch] == [o.token_ids for o in native.generate(prompt_ids, GREEDY)]
    assert [portable.generate([p], GREEDY)[0].token_ids for p in prompt_ids] == [o.token_ids for o in batch]
    native.engine.shutdown()
    portable.engine.shutdown()


@pytest.fixture(scope="module")
def memory(tmp_path_factory, loaded_model):
    """Checkpoints of one memory in three dtypes, with value weights that change the text."""
    from engram_runtime.checkpoint_convert import convert_checkpoint
    import shutil

    root = tmp_path_factory.mktemp("portable")
    engram_init(InitOptions(out=root / "float32", rows_per_head=3001, dtype="float32", progress=False))
    for dtype in ("bfloat16", "fp8_e4m3"):
        shutil.copytree(root / "float32", root / dtype)
        convert_checkpoint(root / dtype, dtype, progress=False)
    return root


def randomise(llm: LLM) -> None:
    """Value weights that move the logits (a fresh checkpoint's are zero), the same in every engine."""
    engram = llm.engine.engram
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lid in engram.layer_ids:
            w = engram.layers[lid].value_proj.weight
            w.copy_(torch.randn(w.shape, generator=gen) * 0.05)
    engram.prepare()


@pytest.mark.parametrize("placement", ["device", "host", "mmap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
def test_engram_memory_gives_the_native_paths_text(loaded_model, prompt_ids, memory, placement, dtype):
    kwargs = dict(engram=str(memory / dtype), table_placement=placement)
    native = LLM(loaded=loaded_model, max_num_seqs=4, max_model_len=128, **kwargs)
    portable = portable_llm(loaded_model, **kwargs)
    assert type(portable.engine.engram.backends[0]) is (Prefetcher if placement == "mmap" else DeviceEngram)
    for llm in (native, portable):
        randomise(llm)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, engram_gates=True)
    want, got = native.generate(prompt_ids, params), portable.generate(prompt_ids, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want):  # gates, computed by other kernels, agree to float32 rounding
        assert all(abs(g.gates[t][lid] - w.gates[t][lid]) < 1e-4 for t in range(8) for lid in (1, 15))
    native.engine.shutdown()
    portable.engine.shutdown()


def test_decode_graphs_replay_the_eager_steps(loaded_model, prompt_ids, memory):
    """Stand-in graphs (offload.device.StepGraph): each decode step copied into the static inputs of
    its padded size and replayed gives the eager engine's tokens, Engram memory included."""
    assert capture_sizes(6) == [1, 2, 4, 6] and capture_sizes(8) == [1, 2, 4, 8]
    kwargs = dict(engram=str(memory / "bfloat16"), table_placement="host")
    eager, graphed = portable_llm(loaded_model, **kwargs), portable_llm(loaded_model, **kwargs)
    for llm in (eager, graphed):
        randomise(llm)
    engine = graphed.engine
    engine.graphs = DecodeGraphs(engine.runner, engine.max_num_seqs, engine.engram)
    replays = []
    run = engine.graphs.run
    engine.graphs.run = lambda chunks: replays.append(len(chunks)) or run(chunks)
    params = SamplingParams(max_tokens=8, temperature=0.8, seed=3, ignore_eos=True)
    prompts = prompt_ids[:3]
    assert [o.token_ids for o in graphed.generate(prompts, params)] == \
           [o.token_ids for o in eager.generate(prompts, params)]
    assert replays and max(replays) == 3  # a batch of 3 replays the graph of 4
    eager.engine.shutdown()
    graphed.engine.shutdown()


def test_a_slow_side_stream_stalls_the_forward_at_the_engram_layer(loaded_model, prompt_ids, memory):
    """The stand-in side stream is a thread: with its fetch slowed down, the forward computes layer
    0 meanwhile, reaches the first Engram layer early and waits there, on that layer's event."""
    llm = portable_llm(loaded_model, engram=str(memory / "float32"), table_placement="host")
    engram, delay = llm.engine.engram, 0.3
    backend = engram.backends[0]
    timeline: dict[str, float | threading.Thread] = {}
    hash_step, submit = backend.hasher.step, engram.submit

    def slow_hash(*args):
        timeline["side"] = threading.current_thread()
        time.sleep(delay)
        return hash_step(*args)

    class Timed:
        def __init__(self, ticket):
            self.ticket = ticket

        def memory(self, layer_id):
            timeline.setdefault("asked", time.perf_counter())
            out = self.ticket.memory(layer_id)
            timeline.setdefault("got", time.perf_counter())
            return out

        def finish(self):
            self.ticket.finish()

    def timed_submit(*args):
        step = submit(*args)
        timeline["submitted"] = time.perf_counter()
        step.ticket = Timed(step.ticket)
        return step

    backend.hasher.step, engram.submit = slow_hash, timed_submit
    llm.generate([prompt_ids[1]], SamplingParams(max_tokens=1, temperature=0))
    assert timeline["side"].name == "engram-side-stream"
    assert timeline["asked"] - timeline["submitted"] < delay / 2  # layer 0 ran while the side stream slept
    assert timeline["got"] - timeline["submitted"] >= 0.9 * delay  # and the forward waited at layer 1
    llm.engine.shutdown()
    assert not timeline["side"].is_alive()  # the engine's shutdown ends its device's worker
