"""Hashing and Engram-compute benchmark: ``python -m bench.hashing [--quick]`` -> bench/results/hashing.json.

Measures, in one process so the ratios hold on a noisy machine:
1. NgramHasher time for one decode step (hash of each row's newest N tokens, as the engine's
   NgramHasher.step_rows makes them, batch 1 and 32) and for a 2048-token
   prefill (hash), with the engram-init default layout for SmolLM2-135M (layers 1 and 15,
   orders 2 and 3, 8 heads each: 2 layers x 16 heads) and the real compressed vocabulary.
2. Engram's own compute per decode step (both layers: key/value projections, gate norms,
   short conv with conv_state) at batch 1 and 32, float32 and bfloat16, SmolLM2 dims.
3. The backbone's decode step (and 2048-token prefill) with engram_runtime's ModelRunner at
   the same batch sizes and dtypes, when the runtime is importable, and the shares above as
   a fraction of it (the goal: hashing under 5% of a step).

Final numbers only on a quiet machine; the JSON records the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from engram_runtime.checkpoint import default_config
from engram_runtime.compression import CompressedTokenizer
from engram_runtime.engram import EngramLayer
from engram_runtime.hashing import NgramHasher

RESULTS = Path(__file__).parent / "results"
HIDDEN = 576            # SmolLM2-135M
BATCHES = (1, 32)
PREFILL = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def time_us(fn, reps: int, warmup: int = 3) -> dict:
    """Median / p90 / min wall time of fn() in microseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    samples.sort()
    return {"median_us": statistics.median(samples), "p90_us": samples[int(0.9 * (len(samples) - 1))],
            "min_us": samples[0], "reps": reps}


def bench_hashing(hasher: NgramHasher, reps: int) -> dict:
    rng = np.random.default_rng(0)
    vocab, n = hasher.ct.vocab_size, hasher.cfg.max_ngram_size
    out = {}
    for b in BATCHES:
        windows = rng.integers(0, vocab, size=(b, n))
        out[f"decode_step_batch{b}"] = time_us(lambda: hasher.hash(windows), reps * 20)
    prompt = rng.integers(0, vocab, size=(1, PREFILL))
    out[f"prefill_{PREFILL}"] = time_us(lambda: hasher.hash(prompt), reps * 2)
    return out


@torch.inference_mode()
def bench_engram_compute(cfg, reps: int) -> dict:
    """Both Engram layers' dense compute for one decode step (T=1), rows already gathered."""
    out = {}
    for dname, dtype in DTYPES.items():
        torch.manual_seed(0)
        layers = [EngramLayer(cfg, lid, HIDDEN).to(dtype).eval() for lid in cfg.layer_ids]
        for b in BATCHES:
            hidden = torch.randn(b, 1, 1, HIDDEN, dtype=dtype)
            emb = torch.randn(b, 1, cfg.heads_total, cfg.head_dim, dtype=dtype)
            states = [layer.new_conv_state(b, dtype=dtype) for layer in layers]

            def step():
                for layer, state in zip(layers, states):
                    layer(hidden, emb, state)
            out[f"{dname}_batch{b}"] = time_us(step, reps * 5)
    return out


def load_runtime():
    """The runtime's ModelRunner on the default backbone, or None with the reason."""
    try:
        from engram_runtime.model_runner import ModelRunner, Chunk
        from engram_runtime.weights import default_model_path, load_weights
    except ImportError as exc:
        return None, f"engram_runtime.model_runner not importable: {exc}"
    config, sd, _ = load_weights(default_model_path())  # the file's quantised blocks are not needed here
    return (config, sd, ModelRunner, Chunk), None


def bench_backbone(runtime, reps: int, quick: bool) -> dict:
    config, sd, ModelRunner, Chunk = runtime
    out = {}
    ctx = 256
    for dname, dtype in DTYPES.items():  # one runner alive at a time
        out.update(_bench_runner(ModelRunner(config, sd, dtype, num_slots=max(BATCHES), max_model_len=PREFILL + 8),
                                 Chunk, dname, ctx, reps, quick))
    return out


def _bench_runner(runner, Chunk, dname: str, ctx: int, reps: int, quick: bool) -> dict:
    out = {}
    for b in BATCHES:
        rows = [Chunk(slot=i, token_ids=[100 + i], start_pos=ctx) for i in range(b)]
        out[f"decode_step_{dname}_batch{b}"] = time_us(lambda: runner.forward(rows), reps)
    prompt = [Chunk(slot=0, token_ids=list(range(1000, 1000 + PREFILL)), start_pos=0)]
    out[f"prefill_{PREFILL}_{dname}"] = time_us(lambda: runner.forward(prompt), 1 if quick else 3, warmup=1)
    return out


def shares(hashing: dict, engram: dict, backbone: dict) -> dict:
    """Hashing and Engram compute as a fraction of the backbone step at the same batch and dtype."""
    out = {}
    for dname in DTYPES:
        for b in BATCHES:
            step = backbone[f"decode_step_{dname}_batch{b}"]["median_us"]
            out[f"hashing_decode_{dname}_batch{b}"] = hashing[f"decode_step_batch{b}"]["median_us"] / step
            out[f"engram_compute_{dname}_batch{b}"] = engram[f"{dname}_batch{b}"]["median_us"] / step
        out[f"hashing_prefill_{PREFILL}_{dname}"] = (hashing[f"prefill_{PREFILL}"]["median_us"]
                                                      / backbone[f"prefill_{PREFILL}_{dname}"]["median_us"])
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bench.hashing", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions (to check the script runs)")
    p.add_argument("--no-backbone", action="store_true", help="skip the backbone step measurement")
    p.add_argument("--out", default=str(RESULTS / "hashing.json"))
    args = p.parse_args(argv)
    reps = 5 if args.quick else 50

    runtime, why_not = (None, "skipped (--no-backbone)") if args.no_backbone else load_runtime()
    from engram_runtime.tokenizer import load_tokenizer
    from engram_runtime.weights import default_model_path

    ct = CompressedTokenizer.from_tokenizer(load_tokenizer(default_model_path()))
    cfg = default_config(vocab_size=ct.vocab_size)
    hasher = NgramHasher(cfg, ct)
    result = {
        "machine": {"load_avg_1m_at_start": os.getloadavg()[0], "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "layout": {"layer_ids": cfg.layer_ids, "heads_per_layer": cfg.heads_total, "head_dim": cfg.head_dim,
                   "hidden_size": HIDDEN, "compressed_vocab": len(ct), "quick": args.quick},
        "hashing": bench_hashing(hasher, reps),
        "engram_compute_per_decode_step": bench_engram_compute(cfg, reps),
    }
    if runtime is not None:
        result["backbone"] = bench_backbone(runtime, reps, args.quick)
        result["share_of_backbone_step"] = shares(result["hashing"], result["engram_compute_per_decode_step"],
                                                  result["backbone"])
    else:
        result["backbone"] = {"skipped": why_not}
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("hashing", "share_of_backbone_step") if k in result}, indent=1))
    return result


if __name__ == "__main__":
    main()
