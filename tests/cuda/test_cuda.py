"""On a real GPU (`pytest -m cuda`, run by scripts/gpu_check.py; skipped without CUDA): the CUDA
path computes what the CPU computes. Random-weight models of the default backbone's shape
(bench.synthetic): nothing is downloaded on the GPU machine and the GGUF does not travel there."""
from __future__ import annotations

import pytest
import torch

from bench.synthetic import engram_config, engram_memory, random_model
from engram_runtime.cuda_graphs import DecodeGraphs
from engram_runtime.model_runner import Chunk, ModelRunner
from offload.device import ComputeDevice

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
PROMPTS = [list(range(100, 117)), list(range(2000, 2009)), list(range(40, 71))]


@pytest.fixture(scope="module")
def model():
    return random_model("smollm2-135m", "cpu", torch.float32)


def decode(runner: ModelRunner, prompts: list[list[int]], steps: int, engram=None) -> list[torch.Tensor]:
    """Teacher-forced: prefill, then each prompt's own next tokens; the logits of every step (on the CPU)."""
    chunks = [Chunk(i, p[:8], 0) for i, p in enumerate(prompts)]
    out = [runner.forward(chunks, engram.submit(chunks, prompts) if engram else None).float().cpu()]
    for t in range(steps):
        chunks = [Chunk(i, [p[8 + t]], 8 + t) for i, p in enumerate(prompts)]
        out.append(runner.forward(chunks, engram.submit(chunks, prompts) if engram else None).float().cpu())
    return out


def test_float32_on_cuda_computes_the_cpus_logits(model):
    cpu = ModelRunner(model.config, model.state_dict, torch.float32, 4, 64)
    gpu = ModelRunner(model.config, model.state_dict, torch.float32, 4, 64, device="cuda")
    for a, b in zip(decode(cpu, PROMPTS, 8), decode(gpu, PROMPTS, 8)):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_bfloat16_stays_close_to_float32(model):
    fp32 = ModelRunner(model.config, model.state_dict, torch.float32, 4, 64, device="cuda")
    bf16 = ModelRunner(model.config, model.state_dict, torch.bfloat16, 4, 64, device="cuda")
    for a, b in zip(decode(fp32, PROMPTS, 4), decode(bf16, PROMPTS, 4)):
        assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_batched_equals_alone(model):
    gpu = ModelRunner(model.config, model.state_dict, torch.float32, 4, 64, device="cuda")
    batched = decode(gpu, PROMPTS, 6)
    for i, prompt in enumerate(PROMPTS):
        alone = decode(gpu, [prompt], 6)
        for a, b in zip(alone, batched):
            torch.testing.assert_close(a[0], b[i], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("placement", ["device", "host"])
def test_graphs_replay_the_eager_steps_with_engram(model, placement):
    """Decode steps replayed from CUDA graphs (Engram hashing, UVA or HBM gathers and the side
    stream inside them) give the eager steps' logits."""
    device = ComputeDevice("cuda")
    runner = ModelRunner(model.config, model.state_dict, torch.bfloat16, 4, 64, device=device)
    cfg = engram_config(2 * 10**6, [1, 15])
    engram, rows = engram_memory(cfg, model, device, placement, runner.cache_slots, torch.bfloat16)
    for table in rows.values():
        table.normal_()  # rows that matter
    eager = decode(runner, PROMPTS, 6, engram)
    graphs = DecodeGraphs(runner, 4, engram)
    chunks = [Chunk(i, p[:8], 0) for i, p in enumerate(PROMPTS)]
    runner.forward(chunks, engram.submit(chunks, PROMPTS))
    for t in range(6):
        chunks = [Chunk(i, [p[8 + t]], 8 + t) for i, p in enumerate(PROMPTS)]
        logits, hook = graphs.run(chunks)
        torch.testing.assert_close(logits.float().cpu(), eager[t + 1], rtol=2e-2, atol=2e-2)
        hook.finish()
