"""What Engram, and keeping its tables off the device, costs in serving throughput,
measured through HTTP with ``loadtest compare``.

    python -m bench.overhead            # full: 8 GB + 1 GB tables, concurrency 1 and 16
    python -m bench.overhead --quick    # toy-scale smoke run of the same pipeline (writes to /tmp)

Per concurrency, one comparison of six engram-serve configurations in interleaved
rounds (one server at a time, restarted per round, since two copies of an 8 GB
table do not fit in RAM next to each other): no Engram; tables of ``--small-gb``
in RAM; tables of ``--table-gb`` in RAM, in RAM without prefetch, ``mmap`` with a
row cache, and fp8.  Every goal is a ratio of two configurations paired by round
(min / median / max over rounds).  The workload is the built-in prompt set with
``ignore_eos`` and sampling at temperature 1 (natural text, so N-gram traffic is
Zipfian as in real use, which is what the row cache relies on, without replaying one
greedy text per prompt, which would flatter it; random-token prompts would defeat any
cache).  Every variant gets the same prompts and token counts; sampled tokens differ,
which changes no compute but the cache's and page cache's hits.
The ``mmap`` variant reads what its row cache misses through the page cache, which on
the development VMs does not stay warm (docs/performance.md, "mmap and the row cache"),
so most misses are disk reads.
Run it on a quiet machine: a figure taken while others compute is void.
Writes bench/results/overhead.json, overhead.md and PNG plots per concurrency.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import load_before_run
from loadtest.checkpoints import create_checkpoint, vocab_for_table_gb
from loadtest.compare import CompareConfig, Variant, paired_ratio, run_compare
from loadtest.plots import latency_plot, throughput_ratio_plot
from loadtest.process import engram_serve_cmd
from loadtest.report import compare_markdown, write_json
from loadtest.workload import WorkloadConfig, build_requests

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(tempfile.gettempdir()) / "engram-bench-overhead"  # server logs: not results

# (label, numerator, denominator, goal or None = report only), on output throughput
GOALS = (
    ("Engram in RAM + prefetch vs no Engram", "ram", "no-engram", 0.97),
    ("large table vs small table (RAM)", "ram", "ram-small", 0.98),
    ("mmap + row cache vs RAM", "mmap-cache", "ram", 0.95),
    ("prefetch off vs on (RAM)", "ram-no-prefetch", "ram", None),
    ("fp8 table vs bf16 (RAM)", "fp8", "ram", None),
)


@dataclass
class OverheadConfig:
    table_gb: float = 8.0  # all Engram tables together, bf16, on disk
    small_gb: float = 1.0
    concurrencies: list[int] = field(default_factory=lambda: [1, 16])
    prompts_per_slot: int = 4  # requests per run = max(min_prompts, concurrency * this)
    min_prompts: int = 16  # so a concurrency-1 run lasts long enough to average out noise
    output_len: int = 128
    rounds: int = 3
    cache_rows: int = 1 << 20
    temperature: float = 1.0  # sampled continuations: the 16 prompts do not replay one text
    server_args: list[str] = field(default_factory=list)
    ckpt_dir: Path = Path.home() / ".cache" / "engram-serve" / "loadtest"
    out_dir: Path = RESULTS
    name: str = "overhead"


def quick_config() -> OverheadConfig:
    """The same pipeline at toy scale: checks the script, measures nothing."""
    return OverheadConfig(table_gb=0.02, small_gb=0.005, concurrencies=[2], prompts_per_slot=1,
                          min_prompts=2, output_len=8, rounds=1, cache_rows=4096, name="overhead_quick",
                          out_dir=LOGS)  # a smoke run's numbers are no results


def variants(cfg: OverheadConfig) -> list[Variant]:
    large = create_checkpoint(cfg.ckpt_dir, vocab_for_table_gb(cfg.table_gb), "bfloat16")
    small = create_checkpoint(cfg.ckpt_dir, vocab_for_table_gb(cfg.small_gb), "bfloat16")
    fp8 = create_checkpoint(cfg.ckpt_dir, vocab_for_table_gb(cfg.table_gb), "fp8_e4m3")
    host = ["--table-placement", "host"]
    return [
        Variant("no-engram", ["--no-engram"]),
        Variant("ram-small", ["--engram", str(small)] + host),
        Variant("ram", ["--engram", str(large)] + host),
        Variant("ram-no-prefetch", ["--engram", str(large), "--no-prefetch"] + host),
        Variant("mmap-cache", ["--engram", str(large), "--table-placement", "mmap",
                               "--cache-rows", str(cfg.cache_rows)]),
        Variant("fp8", ["--engram", str(fp8)] + host),
    ]


def goals(runs: dict[str, list[dict]]) -> list[dict]:
    out = []
    for label, num, den, goal in GOALS:
        r = paired_ratio(runs, num, den, "output_throughput")
        met = None if goal is None or r is None else r["median"] >= goal
        out.append({"figure": label, "ratio": f"{num} / {den}", "goal": goal,
                    "output_throughput_ratio": r, "met": met})
    return out


def goals_markdown(concurrency: int, rows: list[dict]) -> str:
    lines = [f"### Goals at concurrency {concurrency} (output throughput, median [min, max])", "",
             "| figure | ratio | value | goal | met |", "|---|---|---|---|---|"]
    for g in rows:
        r = g["output_throughput_ratio"]
        value = f"{r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]" if r else "-"
        goal = f">= {g['goal']}" if g["goal"] is not None else "report"
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"| {g['figure']} | `{g['ratio']}` | {value} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="toy scale, to check the pipeline")
    p.add_argument("--table-gb", type=float, default=None, help="large tables, GB total (default 8)")
    p.add_argument("--small-gb", type=float, default=None, help="small tables, GB total (default 1)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--output-len", type=int, default=None)
    p.add_argument("--server-args", default="", help="extra engram-serve arguments for every variant")
    p.add_argument("--ckpt-dir", default=None)
    args = p.parse_args(argv)
    cfg = quick_config() if args.quick else OverheadConfig()
    for key in ("table_gb", "small_gb", "rounds", "output_len"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.concurrency:
        cfg.concurrencies = args.concurrency
    if args.ckpt_dir:
        cfg.ckpt_dir = Path(args.ckpt_dir)
    cfg.server_args = args.server_args.split()

    load = load_before_run()
    report: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                    "machine": {"cpus": os.cpu_count(), "loadavg_1min_at_start": load},
                    "by_concurrency": {}}
    md = [f"# Engram serving overhead ({cfg.table_gb:g} GB vs {cfg.small_gb:g} GB tables)", "",
          "Made by `python -m bench.overhead`; ratios paired by round, one server at a time.", ""]
    vs = variants(cfg)
    for c in cfg.concurrencies:
        workload = WorkloadConfig(dataset="builtin",
                                  num_prompts=max(cfg.min_prompts, c * cfg.prompts_per_slot),
                                  output_len=cfg.output_len)
        run_kwargs = {"max_concurrency": c, "warmup_requests": c, "request_rate": float("inf"),
                      "temperature": cfg.temperature}
        compare_cfg = CompareConfig(
            variants=vs, server_cmd=engram_serve_cmd(),
            server_args=["--max-num-seqs", str(max(16, c))] + cfg.server_args,
            out_dir=LOGS / f"{cfg.name}_c{c}", rounds=cfg.rounds, restart_each_round=True,
        )
        cmp = run_compare(compare_cfg, build_requests(workload), run_kwargs,
                          {**asdict(workload), **run_kwargs})
        rows = goals(cmp["runs"])
        throughput_ratio_plot(cmp, cfg.out_dir / f"{cfg.name}_c{c}_throughput.png")
        latency_plot(cmp, cfg.out_dir / f"{cfg.name}_c{c}_latency.png")
        # per-request lists stay out of the committed JSON (the plots carry them), but for the
        # error messages of failed requests
        failures = [{"variant": name, "round": i, "errors": [e for e in run["errors"] if e]}
                    for name, runs in cmp["runs"].items() for i, run in enumerate(runs) if any(run["errors"])]
        report["by_concurrency"][str(c)] = {"goals": rows, "summary": cmp["summary"],
                                            "variants": cmp["variants"], "failures": failures}
        md += [f"## Concurrency {c}", "", goals_markdown(c, rows), compare_markdown(cmp),
               f"![throughput]({cfg.name}_c{c}_throughput.png) ![latency]({cfg.name}_c{c}_latency.png)", ""]
        print(goals_markdown(c, rows))
    report["machine"]["loadavg_1min_at_end"] = os.getloadavg()[0]
    write_json(cfg.out_dir / f"{cfg.name}.json", report)
    (cfg.out_dir / f"{cfg.name}.md").write_text("\n".join(md), encoding="utf-8")
    print(f"written: {cfg.out_dir / (cfg.name + '.json')}, {cfg.name}.md and PNGs; server logs in {LOGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
