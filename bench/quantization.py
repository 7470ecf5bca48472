"""Quantized weights: ``python -m bench.quantization`` -> bench/results/quantization.json.

Two questions decide what ``--quantization auto`` serves (engram_runtime/quantization.py):

- kernel: are the block kernels (block_linear; block_linear_bf16 where the CPU has AVX-512 BF16)
  faster than oneDNN's packed dense matmul for the model's own matmuls, and up to how many rows? Each matmul kind (wqkv, wo, w13, w2, output)
  runs over every layer's weight in turn, so the weights stream from memory as in a decode
  step, not from a cache a loop over one weight would keep warm. Variants alternate per round.
- quality: what the blocks change against the dense float32 weights (quantization none):
  greedy tokens until the first divergence per prompt, and held-out cross-entropy on text
  (Python standard-library sources), for auto, int8 and int4. A prefill of more rows than
  QUANTIZED_MAX_ROWS runs the dense copy, so the cross-entropy is scored by teacher-forced
  decode steps of 3 rows: the blocks' path.

End-to-end decode throughput is ``python -m bench.generate --quantizations auto none``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import sysconfig

import torch

import engram_kernels as kernels
from bench import load_before_run, median_seconds, write_result
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.llm import LLM
from engram_runtime.model import PackedLinear, linear_sources
from engram_runtime.model_runner import Chunk
from engram_runtime.quantization import linear_blocks
from engram_runtime.sampling import SamplingParams
from engram_runtime.weights import LoadedModel, load_model

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "The three laws of thermodynamics state that",
    "To install the package, run",
    "Photosynthesis is the process by which",
    "import numpy as np\nimport matplotlib.pyplot as plt\n\n# plot a sine wave\n",
    "The best way to learn a new language is",
]
# held-out text: Python standard-library sources, as engram-train's default corpus reads them
TEXT_FILES = ("textwrap.py", "fractions.py", "shlex.py")
ROWS = 3  # rows per decode step: within QUANTIZED_MAX_ROWS in bfloat16 and float32, so the blocks serve
# (quantization, dtype) served against the dense float32 weights; dense bfloat16 for scale
VARIANTS = [("auto", "float32"), ("int8", "float32"), ("int4", "float32"), ("none", "bfloat16"),
            ("auto", "bfloat16")]
KINDS = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2", "output")


def dense_weights(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Each matmul's fused float32 weight, by module name, as the Transformer holds it."""
    sd = loaded.state_dict
    return {name: torch.cat([sd[p] for p in parts]) for name, parts in linear_sources(loaded.config, sd).items()}


def kernel(loaded: LoadedModel, rows_list: list[int], rounds: int, reps: int) -> dict:
    """ms per decode step's worth of each matmul kind (all layers), per variant and row count."""
    weights = dense_weights(loaded)
    blocks = linear_blocks(linear_sources(loaded.config, loaded.state_dict), loaded.state_dict, loaded.blocks, "auto")
    variants = {
        "bfloat16": {n: PackedLinear(w.to(torch.bfloat16)) for n, w in weights.items()},
        "float32": {n: PackedLinear(w) for n, w in weights.items()},
    }
    out: dict = {}
    for kind in KINDS:
        names = [n for n in weights if n.endswith(kind)]
        k = weights[names[0]].shape[1]
        out[kind] = {"shape": list(weights[names[0]].shape), "layers": len(names)}
        for rows in rows_list:
            x32 = torch.randn(rows, k)
            xs = {"bfloat16": x32.to(torch.bfloat16), "float32": x32}

            def run_blocks(matmul):
                x = xs["bfloat16"]
                return lambda: [matmul(x, b.qs, b.scales, b.mins, b.bits) for b in (blocks[n] for n in names)]

            def run_dense(dtype: str):
                mods, x = variants[dtype], xs[dtype]
                return lambda: [mods[n](x) for n in names]

            fns = {"blocks": run_blocks(kernels.block_linear), "bfloat16": run_dense("bfloat16"),
                   "float32": run_dense("float32")}
            if kernels.block_linear_bf16_fast():
                fns["blocks_bf16"] = run_blocks(kernels.block_linear_bf16)
            times: dict[str, list[float]] = {v: [] for v in fns}
            for _ in range(rounds):  # alternated, so drift hits every variant alike
                for v, fn in fns.items():
                    times[v].append(median_seconds(fn, reps) * 1e3)
            row = {v: statistics.median(t) for v, t in times.items()}
            out[kind][str(rows)] = row | speedups(row)
            print(kind, rows, {v: round(t, 3) for v, t in out[kind][str(rows)].items()}, flush=True)
    totals = {}
    for rows in rows_list:
        tot = {v: sum(out[kind][str(rows)][v] for kind in KINDS) for v in times}
        totals[str(rows)] = tot = tot | speedups(tot)
        print("all matmuls", rows, {v: round(t, 3) for v, t in tot.items()}, flush=True)
    out["all"] = totals
    return out


def speedups(ms: dict[str, float]) -> dict[str, float]:
    """Each block kernel's speed-up over each dense copy, from ms per variant."""
    return {f"{b}_vs_{d}": ms[d] / ms[b] for b in ("blocks", "blocks_bf16") if b in ms for d in ("bfloat16", "float32")}


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def greedy(loaded: LoadedModel, quantization: str, dtype: str, tokens: int) -> list[list[int]]:
    """The prompts decoded greedily, ROWS at a time (decode steps of the blocks' path)."""
    llm = LLM(loaded=loaded, quantization=quantization, dtype=dtype, max_num_seqs=ROWS, max_model_len=256)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(PROMPTS, params)]


def cross_entropy(loaded: LoadedModel, quantization: str, dtype: str, docs: list[list[int]]) -> float:
    """Mean next-token cross-entropy over docs (as many as ROWS, of one length), fed one token a
    step from position 0, one row per doc."""
    engine = LLMEngine(EngineConfig(quantization=quantization, dtype=dtype, max_num_seqs=len(docs),
                                    max_model_len=len(docs[0]) + 1), loaded)
    total = 0.0
    for pos in range(len(docs[0]) - 1):
        logits = engine.runner.forward([Chunk(i, [doc[pos]], pos) for i, doc in enumerate(docs)]).float()
        targets = torch.tensor([doc[pos + 1] for doc in docs])
        total += float((torch.logsumexp(logits, 1) - logits[torch.arange(len(docs)), targets]).sum())
    return total / (len(docs) * (len(docs[0]) - 1))


def quality(loaded: LoadedModel, tokens: int, doc_tokens: int) -> dict:
    """Greedy agreement and held-out cross-entropy of each variant against dense float32."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [loaded.tokenizer((stdlib / f).read_text(), add_special_tokens=False).input_ids[:doc_tokens]
            for f in TEXT_FILES]
    reference = greedy(loaded, "none", "float32", tokens)
    base_ce = cross_entropy(loaded, "none", "float32", docs)
    out: dict = {"prompts": len(PROMPTS), "tokens": tokens, "text": [str(stdlib / f) for f in TEXT_FILES],
                 "text_tokens": sum(len(d) - 1 for d in docs), "none/float32": {"cross_entropy": base_ce}}
    for quantization, dtype in VARIANTS:
        agree = [first_divergence(a, b) for a, b in zip(greedy(loaded, quantization, dtype, tokens), reference)]
        ce = cross_entropy(loaded, quantization, dtype, docs)
        out[f"{quantization}/{dtype}"] = {
            "tokens_until_divergence": agree, "mean_tokens_until_divergence": statistics.mean(agree),
            "identical_prompts": sum(a == tokens for a in agree), "cross_entropy": ce,
            "cross_entropy_delta": ce - base_ce}
        print(quantization, dtype, out[f"{quantization}/{dtype}"], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--parts", nargs="+", default=["kernel", "quality"], choices=["kernel", "quality"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--doc-tokens", type=int, default=384, help="held-out tokens per text file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the server's default on 2 cores)")
    ap.add_argument("--out", default=str(RESULTS / "quantization.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not kernels.available():
        print("the native kernels are unavailable: nothing to measure", file=sys.stderr)
        return 1
    loaded = load_model(args.model)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report.update({"model": loaded.path, "threads": args.threads, "torch": torch.__version__,
                   "isa": kernels.native().block_linear_isa()})
    load_before_run()
    with torch.inference_mode():
        if "kernel" in args.parts:
            report["kernel"] = {"unit": "ms per decode step (every layer's matmul of a kind)",
                                "loadavg_before": os.getloadavg(),
                                **kernel(loaded, args.rows, args.rounds, args.reps),
                                "loadavg_after": os.getloadavg()}
        if "quality" in args.parts:
            report["quality"] = quality(loaded, args.tokens, args.doc_tokens)
    write_result(out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
