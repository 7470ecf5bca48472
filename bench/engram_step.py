"""Engram's cost per engine step, in-process: ``python -m bench.engram_step`` -> bench/results/engram_step.json.

``bench.overhead`` compares separate server processes, and each process brings its own
placement of the packed weights in memory: two identical engines without Engram differ per
step by more than a few percent (docs/performance.md, "How to read these figures"), so
Engram's cost cannot be resolved that way. Here one LLMEngine with Engram decodes a batch and
its Engram hook is switched off and on every few steps: both sides share weights, caches and the machine's drift, and the ratio (step time
without Engram over step time with it) isolates what Engram adds. Per batch size, with the
prefetch worker and inline (``--no-prefetch``). Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import load_before_run
from engram_runtime.engine_config import EngineConfig
from engram_runtime.engine import LLMEngine
from engram_runtime.sampling import SamplingParams
from engram_runtime.weights import load_model
from loadtest.checkpoints import create_checkpoint, vocab_for_table_gb

RESULTS = Path(__file__).parent / "results"
PROMPT = "The history of the city begins with a small settlement on the river, where traders"


def _no_engram(chunks, token_ids) -> None:
    return None


def switched_steps(engine: LLMEngine, blocks: int, steps_per_block: int) -> dict[str, list[float]]:
    """Step times (s) with the Engram hook off and on, alternating every `steps_per_block` steps;
    the first step after each switch is not timed."""
    engram = engine.engram
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(blocks):
            for name in times:
                if name == "off":
                    engram.submit = _no_engram  # shadows the method: the forward skips Engram
                else:
                    del engram.submit
                engine.step()
                for _ in range(steps_per_block):
                    t0 = time.perf_counter()
                    engine.step()
                    times[name].append(time.perf_counter() - t0)
    finally:
        engram.__dict__.pop("submit", None)
    return times


def measure(loaded, engram: str, dtype: str, batch: int, prefetch: bool, blocks: int, steps_per_block: int) -> dict:
    engine = LLMEngine(EngineConfig(dtype=dtype, engram=engram, prefetch=prefetch, max_num_seqs=max(16, batch),
                                    max_model_len=2048), loaded)
    prompt = loaded.tokenizer(PROMPT, add_special_tokens=False).input_ids
    params = SamplingParams(max_tokens=blocks * 2 * (steps_per_block + 1) + 8, temperature=0, ignore_eos=True)
    try:
        for _ in range(batch):
            engine.add_request(prompt, params, lambda out: None)
        engine._drain_inbox()
        for _ in range(3):  # prefill and warm-up
            engine.step()
        times = switched_steps(engine, blocks, steps_per_block)
    finally:
        engine.shutdown()
    off, on = (statistics.median(times[k]) for k in ("off", "on"))
    return {"dtype": dtype, "batch": batch, "prefetch": prefetch, "steps_each": len(times["on"]),
            "step_ms_without_engram": off * 1e3, "step_ms_with_engram": on * 1e3,
            "engram_ms_per_step": (on - off) * 1e3, "throughput_ratio": off / on}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.engram_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--table-gb", type=float, default=1.0, help="all Engram tables together, bf16")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--steps-per-block", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the prefetch worker has the other core of two)")
    p.add_argument("--ckpt-dir", type=Path, default=Path.home() / ".cache" / "engram-serve" / "loadtest")
    p.add_argument("--out", type=Path, default=RESULTS / "engram_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = load_before_run()
    ckpt = create_checkpoint(args.ckpt_dir, vocab_for_table_gb(args.table_gb), "bfloat16")
    loaded = load_model(None)
    rows = []
    for batch in args.batches:
        for prefetch in (True, False):
            r = measure(loaded, str(ckpt), args.dtype, batch, prefetch, args.blocks, args.steps_per_block)
            print(f"batch {batch:3d} prefetch {'on ' if prefetch else 'off'}: {r['step_ms_without_engram']:.2f} -> "
                  f"{r['step_ms_with_engram']:.2f} ms per step, +{r['engram_ms_per_step']:.2f} ms, "
                  f"ratio {r['throughput_ratio']:.3f}", flush=True)
            rows.append(r)
    report = {"table_gb": args.table_gb, "threads": args.threads, "blocks": args.blocks,
              "steps_per_block": args.steps_per_block, "torch": torch.__version__,
              "loadavg_before": load, "loadavg_after": os.getloadavg()[0], "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
