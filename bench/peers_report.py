"""bench.peers' report: the best peer per concurrency, ratios to it paired by round, and the
JSON, Markdown table and plot a run writes (bench/peers.py runs the servers)."""
from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path

import engram_kernels as kernels
from loadtest.compare import aggregate
from loadtest.report import write_json

PEERS = ("vllm", "llamacpp")  # the other servers; the rest are engram-serve
LABELS = {"vllm": "vLLM (CPU)", "llamacpp": "llama.cpp (llama-cpp-python)",
          "engram": "engram-serve, Engram", "no-engram": "engram-serve, no Engram"}


def best_peer(level_runs: dict[str, list[dict]]) -> str | None:
    """The peer with the higher median output throughput at this level (None: no peer ran)."""
    med = {n: statistics.median(r["output_throughput"] for r in rs) for n, rs in level_runs.items()
           if n in PEERS and rs}
    return max(med, key=med.get) if med else None


def output_lengths(level_runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, rs in level_runs.items():
        lens = [n for r in rs for n, e in zip(r["output_lens"], r["errors"]) if not e]
        if lens:
            out[name] = {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)}
    return out


def summarize(rounds: dict) -> dict[str, dict]:
    """Per concurrency: the best peer, and every server's figures and ratios to it, paired by round."""
    out = {}
    for c, level_runs in rounds["runs"].items():
        if not level_runs or not all(level_runs.values()):
            continue
        best = best_peer(level_runs)
        base = best or next(iter(level_runs))
        summary = aggregate(level_runs, base)
        for entry in summary.values():
            entry.pop("engram", None)  # cache and prefetch figures: bench.overhead's subject, not this one's
        failures = [{"server": n, "round": i + 1, "errors": sorted({e for e in r["errors"] if e})}
                    for n, rs in level_runs.items() for i, r in enumerate(rs) if any(r["errors"])]
        out[str(c)] = {"best_peer": best, "ratio_base": base, "summary": summary,
                       "output_lens": output_lengths(level_runs), "failures": failures}
    return out


def _cell(spread: dict | None, fmt: str) -> str:
    if not spread:
        return "-"
    if len(spread["rounds"]) == 1:
        return f"{spread['median']:{fmt}}"
    return f"{spread['median']:{fmt}} [{spread['min']:{fmt}}, {spread['max']:{fmt}}]"


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = ["# engram-serve against vLLM and llama.cpp", "",
             f"Made by `python -m bench.peers`: {cfg['model']}, built-in prompts, {cfg['output_len']} output tokens, "
             f"temperature {cfg['temperature']}, {cfg['rounds']} round(s), one server up at a time. Cells are "
             "median [min, max] over rounds; ratios are to the best peer (vLLM or llama.cpp, the higher median "
             "output throughput at that concurrency), paired by round: throughput > 1 and TTFT / ITL < 1 favour "
             "the server of that row.", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs, AVX-512 "
             f"{'yes' if report['machine']['avx512'] else 'no'}; load average {report['machine']['loadavg_1min_at_start']:.2f} "
             f"at the start, {report['machine'].get('loadavg_1min_at_end', float('nan')):.2f} at the end.", ""]
    head = ["server", "output tok/s", "median TTFT ms", "median ITL ms", "tok/s / best peer",
            "TTFT / best peer", "ITL / best peer", "output tokens", "failed"]
    for c, level in report["by_concurrency"].items():
        best = level["best_peer"]
        lines += [f"## Concurrency {c}" + (f" (best peer: {best})" if best else " (no peer ran: ratios to "
                                              f"{level['ratio_base']})"), "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, e in level["summary"].items():
            lens = level["output_lens"].get(name)
            length = "-" if not lens else (f"{lens['min']}" if lens["min"] == lens["max"]
                                           else f"{lens['min']}-{lens['max']}")
            cells = [_cell(e["value"].get("output_throughput"), ".1f"), _cell(e["value"].get("median_ttft_ms"), ".0f"),
                     _cell(e["value"].get("median_itl_ms"), ".1f"), _cell(e["ratio"].get("output_throughput"), ".3f"),
                     _cell(e["ratio"].get("median_ttft_ms"), ".3f"), _cell(e["ratio"].get("median_itl_ms"), ".3f"),
                     length, str(e["failed"])]
            lines.append("| " + " | ".join([LABELS.get(name, name)] + cells) + " |")
        lines.append("")
    if report["missing"]:
        lines += ["## Missing", "", "| server | reason | log |", "|---|---|---|"]
        lines += [f"| {LABELS.get(n, n)} | {m['reason']} | `{m['log'] or '-'}` |" for n, m in report["missing"].items()]
        lines.append("")
    lines += ["## Servers", ""]
    for name, s in report["servers"].items():
        extra = f"; request fields added: `{s['extra_body']}`" if s.get("extra_body") else ""
        start = s.get("startup_s")
        span = "" if not start else (f"{min(start):.0f}" if len(start) == 1 else f"{min(start):.0f}-{max(start):.0f}")
        start = f"; start-up {span} s" if start else ""
        lines.append(f"- {LABELS.get(name, name)}: `{' '.join(s['command'])}`{extra}{start}")
    lines += ["", "llama-cpp-python's server serves one request at a time (no parallel slots or continuous "
              "batching), so at concurrency > 1 its requests wait in a queue.", ""]
    if report.get("plot"):
        lines += [f"![peers]({report['plot']})", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Per concurrency, engram-serve's throughput, median TTFT and median ITL over the best peer's."""
    from loadtest import plots  # noqa: F401 - it chose the file-only backend
    import matplotlib.pyplot as plt

    levels = [(c, lv) for c, lv in report["by_concurrency"].items() if lv["best_peer"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    keys = (("output_throughput", "output tok/s / best peer (> 1 better)"),
            ("median_ttft_ms", "median TTFT / best peer (< 1 better)"),
            ("median_itl_ms", "median ITL / best peer (< 1 better)"))
    names = [n for n in ("engram", "no-engram", *PEERS) if any(n in lv["summary"] for _, lv in levels)]
    width = 0.8 / max(1, len(names))
    for ax, (key, title) in zip(axes, keys):
        for i, name in enumerate(names):
            xs, med, lo, hi = [], [], [], []
            for j, (c, lv) in enumerate(levels):
                r = lv["summary"].get(name, {}).get("ratio", {}).get(key)
                if r:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    med.append(r["median"])
                    lo.append(r["median"] - r["min"])
                    hi.append(r["max"] - r["median"])
            if xs:
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=LABELS.get(name, name))
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        if key != "output_throughput":
            ax.set_yscale("log")  # a queue (llama.cpp's at c > 1) multiplies TTFT many times over
        ax.set_xticks(range(len(levels)), [f"c={c}\n(vs {lv['best_peer']})" for c, lv in levels])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("engram-serve against the best CPU peer (median, whiskers min-max over rounds)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "avx512": "avx512f" in kernels.cpu_flags()}


def write(report: dict, out_dir: Path, name: str) -> None:
    png = out_dir / f"{name}.png"
    if any(lv["best_peer"] for lv in report["by_concurrency"].values()):
        plot(report, png)
        report["plot"] = png.name
    write_json(out_dir / f"{name}.json", report)
    (out_dir / f"{name}.md").write_text(markdown(report), encoding="utf-8")
    print(f"written: {out_dir / (name + '.json')}, {name}.md" + (f", {png.name}" if report.get("plot") else ""))
