"""The CUDA path, traced without a GPU (tests/fake_cuda.py: device tensors fake, host work real).

The backbone with its weights, KV cache and rope tables on "cuda" runs prefill, chunked prefill
and decode at several batch sizes with every tensor of the forward on the device and no copy to
the host; sampling in every mode copies one tensor to the host; a whole engine step with Engram
memory, for each table placement and dtype, makes exactly that one host transfer (tokens,
logprobs and gates together). The checks are live: a host tensor in a device op and a host sync
are both caught.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

from engram_runtime.checkpoint_init import InitOptions, engram_init
from engram_runtime.device_engram import DeviceEngram
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.model_runner import Chunk, ModelRunner
from engram_runtime.prefetch import Prefetcher
from engram_runtime.sampling import SamplingParams, sample
from offload.device import ComputeDevice
from tests.fake_cuda import fake_cuda

SAMPLER = "engram_runtime/sampling.py:sample"
MODES = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=0.8, seed=1),
    "top_p": SamplingParams(temperature=1.0, top_p=0.9, seed=2),
    "top_k": SamplingParams(temperature=1.0, top_k=20, seed=3),
    "logprobs": SamplingParams(temperature=0.5, logprobs=3, seed=4),
}


def traced_runner(loaded_model, dtype=torch.bfloat16, slots=8) -> ModelRunner:
    return ModelRunner(loaded_model.config, loaded_model.state_dict, dtype, slots, 128,
                       device=ComputeDevice.traced("cuda"))


def test_backbone_steps_stay_on_the_device(loaded_model):
    with fake_cuda() as census:
        runner = traced_runner(loaded_model)
        assert runner.model.output.weight.device.type == "cuda" and runner.cos.device.type == "cuda"
        assert runner.model.layers[0].attention.k_cache.device.type == "cuda"
        prefill = runner.forward([Chunk(0, list(range(10, 22)), 0), Chunk(3, list(range(30, 35)), 0)])
        chunked = runner.forward([Chunk(0, list(range(50, 57)), 12)])  # the next chunk of slot 0's prompt
        assert prefill.shape == (2, 49152) and chunked.shape == (1, 49152)
        for batch in (1, 3, 8):
            slots = [7, 0, 3, 5, 1, 2, 6, 4][:batch]  # scattered
            logits = runner.forward([Chunk(s, [100 + s], 20 + s) for s in slots])
            assert logits.shape == (batch, 49152) and logits.device.type == "cuda"
        assert prefill.device.type == chunked.device.type == "cuda"
    assert census.transfers == []


@pytest.mark.parametrize("mode", list(MODES))
def test_sampling_copies_one_tensor_to_the_host(mode):
    params = MODES[mode]
    with fake_cuda() as census:
        logits = torch.empty(3, 49152, dtype=torch.bfloat16, device="cuda")
        gates = torch.empty(3, 2, device="cuda")
        result = sample(logits, [params] * 3, [torch.Generator().manual_seed(i) for i in range(3)], gates)
    assert [(t.method, t.where) for t in census.transfers] == [("tolist", SAMPLER)]
    assert len(result.token_ids) == 3 and all(isinstance(t, int) for t in result.token_ids)
    assert len(result.extra[0]) == 2
    assert (result.logprobs[0] is not None) == (params.logprobs is not None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("traced")
    for dtype in ("float32", "bfloat16", "fp8_e4m3"):
        engram_init(InitOptions(out=root / dtype, rows_per_head=3001, dtype=dtype, progress=False))
    return root


@pytest.mark.parametrize("placement", ["device", "host", "mmap"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
def test_engine_steps_with_engram_make_one_host_transfer(loaded_model, checkpoints, placement, dtype):
    """Prefill, then decode steps of two requests with logprobs and gates: each step's one copy
    to the host is the sampler's. Tables the GPU reads itself (device memory, host memory through
    UVA) go to the device backend, whose hashing, gathers and projections are device work; mmap
    goes through host staging, whose copies are host to device only."""
    config = EngineConfig(engram=str(checkpoints / dtype), table_placement=placement, max_num_seqs=4,
                          max_model_len=128)
    outputs = []
    with fake_cuda() as census:
        engine = LLMEngine(config, loaded_model, device=ComputeDevice.traced("cuda"))
        backend = type(engine.engram.backends[0])
        for prompt in ([1, 2, 3, 4, 5], [7, 8]):
            engine.add_request(prompt, SamplingParams(max_tokens=3, temperature=0.7, seed=1, logprobs=1,
                                                      engram_gates=True), outputs.append)
        engine._drain_inbox()
        per_step = []
        while engine.scheduler.has_work():
            before = len(census.transfers)
            engine.step()
            per_step.append([t.where for t in census.transfers[before:]])
        engine.shutdown()
    assert backend is (Prefetcher if placement == "mmap" else DeviceEngram)
    assert per_step == [[SAMPLER]] * 3
    finished = [o for o in outputs if o.finished]
    assert len(finished) == 2 and all(o.error is None for o in finished)
    assert set(outputs[0].gates[0]) == {1, 15}


def test_the_checks_are_live(loaded_model):
    """A host tensor in a device op raises; a host sync inside a step is counted."""
    with fake_cuda():
        runner = traced_runner(loaded_model)
        runner.cos = torch.zeros(runner.cos.shape)  # a rope table left on the host
        with pytest.raises(FakeTensorDeviceMismatchError):
            runner.forward([Chunk(0, [5], 3)])
    with fake_cuda() as census:
        x = torch.ones(4, device="cuda")
        if x.sum() > 0:  # bool() of a device tensor: a host sync
            pass
        x.max().item()
    assert [t.method for t in census.transfers] == ["__bool__", "item"]
