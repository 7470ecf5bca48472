"""Decode throughput: this runtime vs transformers' generate vs the matmul-only roofline.

All three run in this one process, interleaved per (dtype, batch) over `--rounds`
rounds (medians reported), so their ratios hold on a noisy machine. Decode tok/s =
batch / the MEDIAN decode step time (prefill excluded); the median keeps a step
preempted by another process on a shared machine from moving the figure.

- runtime: LLMEngine stepped in this thread; B identical-length prompts, prefill
  first, then `--steps` timed decode steps.
- transformers: AutoModelForCausalLM from the same GGUF in the same dtype;
  generate(max_new_tokens=steps+1) with a logits processor that timestamps every
  step (the gaps between its calls are the decode steps).
- roofline: every weight matrix of the model (q, k, v, o, gate, up, down per layer,
  lm_head) as stored by transformers, multiplied by a [B, in] activation with
  F.linear in a loop, nothing else: what the GEMMs alone cost per decode step.
  roofline_packed: the same loop with the prepacked oneDNN matmul the runtime
  itself uses (faster than F.linear on CPU), the stricter bound.

With `--quantizations auto none` one engine per mode decodes in the same rounds, alternated
(engram_runtime/quantization.py; `runtime_<mode>` per mode, `runtime` the first).

    python -m bench.generate [--quick] [--batches 1 8 32 128] [--dtypes float32 bfloat16]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import median_seconds, write_result
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.model import PackedLinear
from engram_runtime.model_runner import parse_dtype
from engram_runtime.sampling import SamplingParams
from engram_runtime.weights import LoadedModel, load_model

RESULTS = Path(__file__).parent / "results"


def roofline(loaded: LoadedModel, dtype: torch.dtype, batch: int, reps: int, packed: bool = False) -> float:
    """packed=False: F.linear (the plain roofline); packed=True: the same loop with
    the prepacked oneDNN kernel the runtime uses (the bound this runtime can reach)."""
    weights = [w.to(dtype) for name, w in loaded.state_dict.items() if w.dim() == 2 and "embed" not in name]
    if loaded.config.tie_word_embeddings:
        weights.append(loaded.state_dict["model.embed_tokens.weight"].to(dtype))
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=dtype) for w in weights}
    mods = [PackedLinear(w) if packed else (lambda x, w=w: F.linear(x, w)) for w in weights]

    def step():
        for w, m in zip(weights, mods):
            m(xs[w.shape[1]])

    return batch / median_seconds(step, reps)


def runtime_decode(engine: LLMEngine, prompt: list[int], batch: int, steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(prompt, params, lambda out: None)
    engine._drain_inbox()
    while any(s.in_prefill for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    step_s = median_seconds(engine.step, steps)  # after one untimed decode step
    engine.run_until_done()
    return batch / step_s


class StepClock:
    """A transformers logits processor that only records when each step's logits arrive."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def transformers_decode(model, prompt: list[int], batch: int, steps: int) -> float:
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt] * batch)
    clock = StepClock()
    kw = dict(do_sample=False, pad_token_id=2, eos_token_id=None, logits_processor=LogitsProcessorList([clock]))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        clock.times.clear()
        out = model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kw)
    assert out.shape[1] == len(prompt) + steps + 1
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]  # first call ends the prefill
    return batch / statistics.median(gaps)


def load_transformers(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32)
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or HF dir (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16, 32, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repeats per batch; medians are reported")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="batches 1 8, 6 steps, 1 round: checks the script runs")
    ap.add_argument("--quantizations", nargs="+", default=["auto"], help="EngineConfig.quantization modes, "
                    "one engine each, alternated within every round")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=str(RESULTS / "generate.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batches, args.steps, args.rounds = [1, 8], 6, 1

    loaded = load_model(args.model)
    text = "The history of the city begins with a small settlement on the river, where traders"
    prompt = (loaded.tokenizer(text, add_special_tokens=False).input_ids * 8)[: args.prompt_len]
    max_len = args.prompt_len + args.steps + 8
    load_before = os.getloadavg()
    results: dict = {}
    for dtype_name in args.dtypes:
        dtype = parse_dtype(dtype_name)
        engines = {q: LLMEngine(EngineConfig(dtype=dtype_name, max_num_seqs=max(args.batches), max_model_len=max_len,
                                             max_num_batched_tokens=max(4096, max(args.batches) * args.prompt_len),
                                             quantization=q), loaded)
                   for q in args.quantizations}
        hf = None if args.no_transformers else load_transformers(loaded.path, dtype)
        per_batch = {}
        for b in args.batches:
            reps = max(3, args.steps // 4)
            rounds = {"roofline": [], "roofline_packed": [], **{f"runtime_{q}": [] for q in engines}}
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every variant
                rounds["roofline"].append(roofline(loaded, dtype, b, reps))
                rounds["roofline_packed"].append(roofline(loaded, dtype, b, reps, packed=True))
                for q, engine in engines.items():
                    rounds[f"runtime_{q}"].append(runtime_decode(engine, prompt, b, args.steps))
            row = {k: statistics.median(v) for k, v in rounds.items()}
            row["runtime"] = row[f"runtime_{args.quantizations[0]}"]
            if hf is not None:
                row["transformers"] = transformers_decode(hf, prompt, b, args.steps)
                row["runtime_vs_transformers"] = row["runtime"] / row["transformers"]
            row["runtime_vs_roofline"] = row["runtime"] / row["roofline"]
            row["runtime_vs_roofline_packed"] = row["runtime"] / row["roofline_packed"]
            per_batch[str(b)] = row
            print(dtype_name, b, {k: round(v, 2) for k, v in row.items()}, flush=True)
        results[dtype_name] = per_batch
        del engines, hf
    report = {
        "unit": "decode tokens/s (aggregate over the batch)",
        "model": loaded.path,
        "prompt_len": args.prompt_len,
        "decode_steps": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "quantizations": args.quantizations,
        "cpu": platform.processor() or platform.machine(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
