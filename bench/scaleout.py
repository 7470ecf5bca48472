"""One engine against several on one host, and what their table copies cost in memory.

    python -m bench.scaleout            # -> bench/results/scaleout.json, scaleout.md, PNGs

Throughput: `loadtest compare` of one engine (one compute thread, the default on 2 cores)
against `--data-parallel-size 2` (two engines, one thread each, on their own cores, one
shared table copy), restarted per round, at each concurrency; output throughput paired by
round.
Memory: 1, 2 and 3 engram-serve processes with the same tables, once with
`--table-placement shared` (one copy in /dev/shm mapped by all) and once with `host` (a copy
each); the sum of the processes' Pss, whole and for the shared copy's mapping, from smaps.
Run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench import load_before_run
from loadtest.checkpoints import create_checkpoint, vocab_for_table_gb
from loadtest.compare import CompareConfig, Variant, paired_ratio, run_compare
from loadtest.memory import mapping_kb, process_kb
from loadtest.plots import throughput_ratio_plot
from loadtest.process import ServerProcess, engram_serve_cmd
from loadtest.report import compare_markdown, write_json
from loadtest.workload import WorkloadConfig, build_requests

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(tempfile.gettempdir()) / "engram-bench-scaleout"  # server logs: not results
SHARED_DIR = Path("/dev/shm/engram-bench-scaleout")  # its own copies, removed at the end


def throughput(ckpt: Path, concurrency: int, rounds: int, output_len: int) -> dict:
    tables = ["--engram", str(ckpt), "--table-placement", "shared", "--shared-table-dir", str(SHARED_DIR)]
    variants = [Variant("1-engine", tables + ["--threads", "1"]),
                Variant("2-engines", tables + ["--data-parallel-size", "2"])]
    workload = WorkloadConfig(dataset="builtin", num_prompts=2 * concurrency, output_len=output_len)
    run_kwargs = {"max_concurrency": concurrency, "warmup_requests": concurrency, "request_rate": float("inf"),
                  "temperature": 1.0}
    cfg = CompareConfig(variants=variants, server_cmd=engram_serve_cmd(),
                        server_args=["--dtype", "bfloat16", "--max-num-seqs", str(concurrency)],
                        out_dir=LOGS / f"c{concurrency}", rounds=rounds, restart_each_round=True)
    cmp = run_compare(cfg, build_requests(workload), run_kwargs, {**asdict(workload), **run_kwargs})
    throughput_ratio_plot(cmp, RESULTS / f"scaleout_c{concurrency}_throughput.png")
    ratio = paired_ratio(cmp["runs"], "2-engines", "1-engine", "output_throughput")
    return {"ratio_2_engines_over_1": ratio, "summary": cmp["summary"], "variants": cmp["variants"],
            "markdown": compare_markdown(cmp)}


def memory(ckpt: Path, placement: str, workers: int) -> dict:
    """Start `workers` servers of one placement, measure them once all are ready, stop them."""
    servers = [ServerProcess(engram_serve_cmd(["--engram", str(ckpt), "--table-placement", placement,
                                               "--shared-table-dir", str(SHARED_DIR), "--max-model-len", "256",
                                               "--max-num-seqs", "4", "--threads", "1"]),
                             LOGS / f"memory-{placement}-{workers}-{i}.log") for i in range(workers)]
    try:
        for s in servers:  # one after another: the first writes the shared copy, the others map it
            s.start()
        copies = sorted(SHARED_DIR.glob("*.safetensors")) if placement == "shared" else []
        procs = [process_kb(s.proc.pid) for s in servers]
        mapped = [sum(mapping_kb(s.proc.pid, c)["Pss"] for c in copies) for s in servers]
    finally:
        for s in servers:
            s.stop()
    return {"placement": placement, "workers": workers, "pss_total_mib": sum(p["Pss"] for p in procs) / 1024,
            "rss_total_mib": sum(p["Rss"] for p in procs) / 1024, "shared_copy_pss_mib": sum(mapped) / 1024}


def memory_plot(rows: list[dict], table_mib: float, path: Path) -> None:
    import matplotlib.pyplot as plt  # after loadtest.plots chose the file-only backend

    fig, ax = plt.subplots(figsize=(6, 4))
    for placement in ("host", "shared"):
        sel = [r for r in rows if r["placement"] == placement]
        ax.plot([r["workers"] for r in sel], [r["pss_total_mib"] / 1024 for r in sel], "o-",
                label=f"{placement}: sum of the processes' Pss")
    ws = sorted({r["workers"] for r in rows})
    ax.plot(ws, [w * table_mib / 1024 for w in ws], "k:", label="N table copies alone")
    ax.set_xlabel("engram-serve processes")
    ax.set_ylabel("GiB")
    ax.set_xticks(ws)
    ax.legend()
    ax.set_title("Host memory of N processes with the same tables")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    p.add_argument("--table-gb", type=float, default=1.0, help="all Engram tables together, bf16")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ckpt-dir", type=Path, default=Path.home() / ".cache" / "engram-serve" / "loadtest")
    args = p.parse_args(argv)
    load = load_before_run()
    ckpt = create_checkpoint(args.ckpt_dir, vocab_for_table_gb(args.table_gb), "bfloat16")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict = {"table_gb": args.table_gb, "cpus": os.cpu_count(), "loadavg_1min_at_start": load,
                    "throughput": {}, "memory": []}
    md = ["# One engine vs two on one host", "", "Made by `python -m bench.scaleout`.", ""]
    try:
        for w in args.workers:
            for placement in ("shared", "host"):
                report["memory"].append(memory(ckpt, placement, w))
                print(report["memory"][-1], flush=True)
        for c in args.concurrency:
            t = throughput(ckpt, c, args.rounds, args.output_len)
            report["throughput"][str(c)] = {k: v for k, v in t.items() if k != "markdown"}
            r = t["ratio_2_engines_over_1"]
            md += [f"## Concurrency {c}: 2 engines / 1 = {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}]", "",
                   t["markdown"], f"![throughput](scaleout_c{c}_throughput.png)", ""]
            print(md[-4], flush=True)
    finally:
        shutil.rmtree(SHARED_DIR, ignore_errors=True)
    table_mib = sum(f.stat().st_size for f in ckpt.glob("*.safetensors") if f.name != "dense.safetensors") / 2**20
    memory_plot(report["memory"], table_mib, RESULTS / "scaleout_memory.png")
    md += ["## Memory (MiB)", "", f"Tables: {table_mib:.0f} MiB.", "",
           "| processes | placement | sum of Pss | of which the shared copy | sum of Rss |", "|---|---|---|---|---|"]
    md += [f"| {r['workers']} | {r['placement']} | {r['pss_total_mib']:.0f} | {r['shared_copy_pss_mib']:.0f} | "
           f"{r['rss_total_mib']:.0f} |" for r in report["memory"]]
    md += ["", "![memory](scaleout_memory.png)", ""]
    report["table_mib"] = table_mib
    report["loadavg_1min_at_end"] = os.getloadavg()[0]
    write_json(RESULTS / "scaleout.json", report)
    (RESULTS / "scaleout.md").write_text("\n".join(md), encoding="utf-8")
    print(f"written: {RESULTS / 'scaleout.json'}, scaleout.md and PNGs; server logs in {LOGS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
