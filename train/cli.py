"""Console scripts `engram-train` and `engram-eval` (argparse over TrainConfig / EvalConfig).

Expected failures (missing corpus, corrupted checkpoint, bad flag values) end with one line
`engram-train: error: <message naming the file or flag>` and exit status 2, never a
traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Callable

from engram_runtime.checkpoint_format import EngramCheckpointError
from engram_runtime.weights import ModelLoadError
from offload.tablefile import TableFileError
from train.ckpt_store import CheckpointError
from train.corpus import CorpusError
from train.evaluate import EvalConfig, evaluate
from train.trainer import TrainConfig, train

USER_ERRORS = (CorpusError, CheckpointError, EngramCheckpointError, ModelLoadError, TableFileError, ValueError)

_HELP = {
    "dtype": "backbone compute dtype while training: float32 or bfloat16 (~3x faster matmuls here)",
    "tokens": "training tokens; steps = tokens / (batch_size * seq_len)",
    "seq_len": "tokens per training window",
    "batch_size": "windows per step",
    "dense_lr": "AdamW learning rate of the dense Engram parameters (projections, norms, conv)",
    "table_lr": "learning rate of the sparse table optimizer",
    "table_optimizer": "adagrad (row-wise, 1 float of state per row) or adam (lazy, 2x the table in state)",
    "warmup_steps": "linear warm-up steps, then cosine decay",
    "min_lr_ratio": "final learning rate as a fraction of the peak",
    "weight_decay": "AdamW weight decay",
    "heldout_fraction": "share of the trained projects' FILES held out (the in-domain evaluation)",
    "heldout_projects": "share of PROJECTS (top-level folders of the corpus paths) held out whole "
                        "(the cross-project evaluation)",
    "file_tokens": "tokens read from each training file (a run at a fixed place in it); 0 reads whole files",
    "eval_every": "steps between held-out evaluations",
    "eval_tokens": "held-out tokens scored per evaluation",
    "ckpt_every": "steps between atomic checkpoints",
    "seed": "data order seed",
    "table_init_scale": "an untrained checkpoint's N(0, 1) rows are first multiplied by this",
    "row_dropout": "share of looked-up rows zeroed in each training step",
}


def run_cli(prog: str, fn: Callable[[], None]) -> None:
    try:
        fn()
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        sys.exit(130)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="backbone GGUF file or HF directory (default: SmolLM2-135M)")
    p.add_argument("--engram", required=True, help="Engram checkpoint directory (made by engram-init)")
    p.add_argument("--corpus", nargs="+", required=True,
                   help="files or folders: .txt, .md, source code, .jsonl with a 'text' field")


def train_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="engram-train",
                                description="Train the Engram memory of a checkpoint on local text; "
                                            "the backbone stays frozen.")
    _common(p)
    defaults = TrainConfig(engram="", corpus=[])
    for f in fields(TrainConfig):
        if f.name in _HELP:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                           default=getattr(defaults, f.name), help=f"{_HELP[f.name]} (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --engram from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(p.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    run_cli("engram-train", lambda: print(json.dumps(train(TrainConfig(**args)), indent=1)))


def eval_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="engram-eval",
                                description="Held-out cross-entropy and perplexity: backbone alone vs with Engram.")
    _common(p)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=65_536,
                   help="tokens to score per held-out set; 0 scores every token of every file")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--all", dest="all_files", action="store_true",
                   help="score every file of the corpus (a corpus the memory never trained on)")
    p.add_argument("--heldout-fraction", type=float, default=None,
                   help="split the corpus anew with this share of files held out (1 = --all); "
                        "default: the held-out sets recorded in the checkpoint's split.json")
    p.add_argument("--heldout-projects", type=float, default=None,
                   help="with a new split: the share of projects held out whole")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone compute dtype")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = vars(p.parse_args(argv))
    as_json = args.pop("json")

    def run() -> None:
        report = evaluate(EvalConfig(**args))
        print(json.dumps(report, indent=1) if as_json else report["markdown"])

    run_cli("engram-eval", run)
