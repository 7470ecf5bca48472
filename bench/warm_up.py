"""Cold-shape stalls: ``python -m bench.warm_up`` -> bench/results/warm_up.json.

The first time an engine met a larger batch it stalled: the KV cache, numpy's calloc, was
committed in 2 MiB transparent huge pages on the first write to each slot, each fault waiting
on memory compaction (model.zeros_on_demand now maps 4 KiB pages). Per burst size, one fresh
engine generates the same burst several times; the figure is the first burst's time over the
median of the later ones (goal: at most 1.2), with the KV cache as it is allocated now and as
numpy allocated it before (reproduced here).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench import load_before_run, write_result
from engram_runtime import model
from engram_runtime.llm import LLM
from engram_runtime.sampling import SamplingParams
from engram_runtime.weights import load_model

RESULTS = Path(__file__).parent / "results"


def numpy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The KV cache's allocation before: numpy's calloc, which madvises huge pages for large arrays."""
    if dtype == torch.bfloat16:
        return torch.from_numpy(np.zeros(shape, np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.zeros(shape, np.float32))


def bursts(loaded, size: int, repeats: int, allocation: str, dtype: str) -> dict:
    """A fresh engine (max_num_seqs 64, like the server's default), the same burst `repeats` times."""
    current = model.zeros_on_demand
    if allocation == "numpy_huge_pages":
        model.zeros_on_demand = numpy_zeros
    try:
        llm = LLM(loaded=loaded, dtype=dtype, max_num_seqs=64)
    finally:
        model.zeros_on_demand = current
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(size)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        llm.generate(prompts, params)
        times.append(time.perf_counter() - t)
    return {"burst_s": times, "first_over_later": times[0] / statistics.median(times[1:])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "warm_up.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(None)
    report: dict = {"dtype": args.dtype, "threads": args.threads, "max_tokens": 8, "loadavg_before": load_before_run()}
    for size in args.sizes:
        for allocation in ("4k_pages", "numpy_huge_pages"):
            row = bursts(loaded, size, args.repeats, allocation, args.dtype)
            report[f"{size}/{allocation}"] = row
            print(size, allocation, round(row["first_over_later"], 3), [round(t, 3) for t in row["burst_s"]], flush=True)
    report["loadavg_after"] = os.getloadavg()
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
