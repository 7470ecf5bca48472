"""Does a trained memory serve as fast as an untrained one of the same layout?

Training changes the values in the tables and the dense weights, never their shapes or dtypes,
so serving cost should not move. This checks it with `bench.engram_step`'s in-engine
measurement (Engram switched off and on every few steps inside one engine): the trained
checkpoint (default: `make train-default`'s) against a fresh `engram-init` one of the same
config and table dtype, in interleaved rounds, at each batch size, prefetch on (the server's
default). `python -m bench.train_serving` -> bench/results/train_serving.json. Quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from bench import load_before_run
from bench.engram_step import measure
from engram_runtime.checkpoint import backbone_info, init_checkpoint, load_checkpoint
from engram_runtime.weights import load_model
from train.default import DEFAULT_DIR

RESULTS = Path(__file__).parent / "results"


def untrained_twin(trained: Path, cache: Path) -> Path:
    """An engram-init checkpoint with the trained one's config and table dtype (made once)."""
    ckpt = load_checkpoint(trained)
    dtypes = {e["dtype"] for e in ckpt.tables_manifest.values()}
    out = cache / f"untrained-twin-{trained.name}"
    if not (out / "engram.json").is_file():
        init_checkpoint(out, ckpt.config, backbone_info(None), dtype=dtypes.pop(), overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--engram", type=Path, default=DEFAULT_DIR, help="the trained checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=20)
    p.add_argument("--steps-per-block", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: the prefetch worker has the other core of two)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "engram-serve" / "loadtest")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = load_before_run()
    ckpts = {"trained": args.engram, "untrained": untrained_twin(args.engram, args.cache)}
    loaded = load_model(None)
    rows = []
    for r in range(args.rounds):
        for batch in args.batches:
            for name, path in ckpts.items():
                m = measure(loaded, str(path), "bfloat16", batch, True, args.blocks, args.steps_per_block)
                rows.append({"round": r, "checkpoint": name, **m})
                print(f"round {r} batch {batch:3d} {name:9s}: {m['step_ms_with_engram']:.2f} ms per step with Engram, "
                      f"+{m['engram_ms_per_step']:.2f} ms, ratio {m['throughput_ratio']:.3f}", flush=True)
    summary = {}
    for batch in args.batches:
        for name in ckpts:
            sel = [x for x in rows if x["batch"] == batch and x["checkpoint"] == name]
            summary[f"batch{batch}_{name}"] = {k: statistics.median(x[k] for x in sel)
                                               for k in ("step_ms_with_engram", "engram_ms_per_step", "throughput_ratio")}
    report = {"trained": str(args.engram), "threads": args.threads, "rounds": args.rounds, "blocks": args.blocks,
              "steps_per_block": args.steps_per_block, "loadavg_before": load, "loadavg_after": os.getloadavg()[0],
              "summary": summary, "results": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_serving.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
