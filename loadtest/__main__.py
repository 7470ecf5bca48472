"""Command line: ``python -m loadtest run ...`` and ``python -m loadtest compare ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadtest.workload import WorkloadConfig, WorkloadError, build_requests


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="random",
                   help="'random' (token-id prompts of --input-len), 'builtin' (16 short "
                        "prompts) or a path to a .txt (one prompt per line) or .jsonl "
                        "('prompt', optional 'output_len') file")
    g.add_argument("--num-prompts", type=int, default=100)
    g.add_argument("--input-len", type=int, default=128, help="random prompts' length in tokens")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly in [L*(1-r), L*(1+r)]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests/s (Poisson arrivals); inf sends all at once")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of inter-arrival gaps: 1 = Poisson, <1 burstier")
    g.add_argument("--max-concurrency", type=int, default=None)
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos (outputs may end early at EOS)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--warmup-requests", type=int, default=0,
                   help="requests sent (not measured) before the run")
    g.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    g.add_argument("--no-progress", dest="progress", action="store_false")


def workload_from_args(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(
        dataset=args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
    )


def run_kwargs(args: argparse.Namespace) -> dict:
    """RunConfig fields shared by `run` and `compare` (everything but the target)."""
    return dict(
        request_rate=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, temperature=args.temperature,
        ignore_eos=args.ignore_eos, timeout=args.timeout,
        warmup_requests=args.warmup_requests, seed=args.seed, progress=args.progress,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from loadtest.report import format_summary, write_json
    from loadtest.runner import RunConfig, run

    cfg = RunConfig(base_url=args.base_url, model=args.model, api_key=args.api_key,
                    endpoint=args.endpoint, scrape=args.scrape, **run_kwargs(args))
    result = run(cfg, build_requests(workload_from_args(args)))
    print(format_summary(result))
    if args.result_file:
        write_json(Path(args.result_file), result)
        print(f"result written to {args.result_file}")
    return 0


def add_compare_args(p: argparse.ArgumentParser) -> None:
    from loadtest.compare import DEFAULT_VARIANTS

    p.add_argument("--variant", action="append", default=None, metavar="NAME=ARGS",
                   help="a server configuration (repeatable; the first is the base of every "
                        "ratio). ARGS may use {engram}, {engram_fp8}, {cache_rows}. Default: "
                        + "; ".join(f"{k}={v}" for k, v in DEFAULT_VARIANTS.items()))
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the default variants, e.g. no-engram,ram")
    p.add_argument("--server-cmd", default=None,
                   help="server command (default: this checkout's engram-serve, python -m server.cli); "
                        "--host/--port are appended")
    p.add_argument("--server-args", default="", help="arguments common to every variant")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds (A B C A B C ...); spread is min/median/max over them")
    p.add_argument("--restart-each-round", action="store_true",
                   help="start one server at a time, per round (for tables too large to "
                        "keep one copy per variant in RAM)")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", default=None,
                   help="where compare.json, compare.md, PNGs and server logs go "
                        "(default: loadtest-results/compare-<date>)")
    t = p.add_argument_group("Engram tables (fill {engram} / {engram_fp8})")
    t.add_argument("--engram", default=None, help="an existing Engram checkpoint directory")
    t.add_argument("--engram-fp8", default=None, help="an existing fp8 checkpoint directory")
    t.add_argument("--engram-vocab-size", type=int, default=None,
                   help="create (once, cached) a checkpoint with this engram_vocab_size")
    t.add_argument("--table-gb", type=float, default=None,
                   help="create (once, cached) a checkpoint whose tables, all Engram layers "
                        "together, take this many GB (1e9 bytes; engram-init's --table-gb is "
                        "per layer)")
    t.add_argument("--table-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the created checkpoint (the fp8 variant gets its own "
                        "fp8_e4m3 checkpoint of the same layout)")
    t.add_argument("--ckpt-dir", default=None,
                   help="where created checkpoints are cached (default: ~/.cache/engram-serve/loadtest)")
    t.add_argument("--cache-rows", type=int, default=65536, help="fills {cache_rows}")


def cmd_compare(args: argparse.Namespace) -> int:
    import shlex
    from datetime import datetime, timezone

    from loadtest.process import engram_serve_cmd
    from loadtest.checkpoints import resolve_checkpoints
    from loadtest.compare import DEFAULT_VARIANTS, CompareConfig, Variant, run_compare
    from loadtest.plots import latency_plot, throughput_ratio_plot
    from loadtest.report import compare_markdown, write_json

    if args.variant:
        specs = args.variant
    else:
        names = args.variants.split(",") if args.variants else list(DEFAULT_VARIANTS)
        unknown = [n for n in names if n not in DEFAULT_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variant(s) {unknown}; known: {list(DEFAULT_VARIANTS)}")
        specs = [f"{n}={DEFAULT_VARIANTS[n]}" for n in names]
    fill = resolve_checkpoints(args, needed="".join(specs))
    fill["cache_rows"] = str(args.cache_rows)
    out_dir = Path(args.out_dir or "loadtest-results/compare-"
                   + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    cfg = CompareConfig(
        variants=[Variant.parse(s, fill) for s in specs],
        server_cmd=shlex.split(args.server_cmd) if args.server_cmd else engram_serve_cmd(),
        server_args=shlex.split(args.server_args), out_dir=out_dir, rounds=args.rounds,
        restart_each_round=args.restart_each_round, startup_timeout=args.startup_timeout,
    )
    workload = workload_from_args(args)
    kwargs = run_kwargs(args)
    meta = {**vars(workload), **kwargs, "tables": fill}
    comparison = run_compare(cfg, build_requests(workload), kwargs, meta)
    write_json(out_dir / "compare.json", comparison)
    (out_dir / "compare.md").write_text(compare_markdown(comparison), encoding="utf-8")
    throughput_ratio_plot(comparison, out_dir / "throughput_ratio.png")
    latency_plot(comparison, out_dir / "latency.png")
    print(compare_markdown(comparison))
    print(f"written: {out_dir}/compare.json, compare.md, throughput_ratio.png, latency.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load-test an OpenAI-compatible server, or compare engram-serve configurations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="drive a running server and summarise like `vllm bench serve`")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--endpoint", default="/v1/completions",
                   help="path of an OpenAI-style (text) completions endpoint")
    p.add_argument("--api-key", default=None)
    p.add_argument("--no-scrape", dest="scrape", action="store_false",
                   help="do not read /metrics before and after")
    p.add_argument("--result-file", default=None, help="write the result JSON here")
    add_workload_args(p)
    p.set_defaults(func=cmd_run)

    c = sub.add_parser("compare", help="start engram-serve per configuration and compare "
                                       "them on one workload in interleaved rounds")
    add_compare_args(c)
    add_workload_args(c)
    c.set_defaults(func=cmd_compare, warmup_requests=4)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from loadtest.process import ServerStartError
    from loadtest.runner import TargetError

    try:
        return args.func(args)
    except (WorkloadError, TargetError, ServerStartError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
