"""Human-readable output: the run summary in ``vllm bench serve``'s layout and the
Markdown table of a comparison."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

WIDTH = 50

_LATENCY_TITLES = (
    ("ttft", "TTFT", "Time to First Token"),
    ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
    ("itl", "ITL", "Inter-token Latency"),
    ("e2el", "E2EL", "End-to-end Latency"),
)


def _line(label: str, value) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:<10}"


def format_summary(result: dict) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=WIDTH, c="=")]
    lines += [
        _line("Successful requests:", result["completed"]),
        _line("Failed requests:", result["failed"]),
    ]
    errors = Counter(e for e in result.get("errors", []) if e)
    lines += [f"  {n} x {message[:80]}" for message, n in errors.most_common(3)]
    lines += [
        _line("Maximum request concurrency:", result.get("max_concurrency")),
        _line("Benchmark duration (s):", result["duration"]),
        _line("Total input tokens:", result["total_input_tokens"]),
        _line("Total generated tokens:", result["total_output_tokens"]),
        _line("Request throughput (req/s):", result["request_throughput"]),
        _line("Output token throughput (tok/s):", result["output_throughput"]),
        _line("Total Token throughput (tok/s):", result["total_token_throughput"]),
    ]
    for key, short, title in _LATENCY_TITLES:
        lines.append("{s:{c}^{n}}".format(s=title, n=WIDTH, c="-"))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            lines.append(_line(f"{label} {short} (ms):", result[f"{stat}_{key}_ms"]))
    engram = result.get("engram")
    if engram:
        lines.append("{s:{c}^{n}}".format(s="Engram tables", n=WIDTH, c="-"))
        for key, label, scale in (
            ("cache_hit_rate", "Cache hit rate (%):", 100.0),
            ("prefetch_wait_p50_ms", "Prefetch wait P50 (ms):", 1.0),
            ("prefetch_wait_p99_ms", "Prefetch wait P99 (ms):", 1.0),
            ("prefetch_wait_share_of_step", "Prefetch wait / step time (%):", 100.0),
            ("rows_gathered", "Rows gathered (M):", 1e-6),
            ("bytes_gathered_per_s", "Gather bandwidth (MB/s):", 1e-6),
        ):
            if key in engram:
                lines.append(_line(label, float(engram[key]) * scale))
        for layer, ratio in sorted(engram.get("utilisation_per_layer", {}).items()):
            lines.append(_line(f"Rows touched, layer {layer} (%):", 100.0 * ratio))
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """JSON without NaN/Infinity (not JSON): they become null."""

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(data), indent=2) + "\n", encoding="utf-8")


def _cell(spread: dict | None, fmt: str) -> str:
    if not spread:
        return "-"
    return f"{spread['median']:{fmt}} [{spread['min']:{fmt}}, {spread['max']:{fmt}}]"


_TABLE_COLUMNS = (
    ("output tok/s", "value", "output_throughput", ".1f"),
    ("ratio", "ratio", "output_throughput", ".3f"),
    ("mean TTFT ms", "value", "mean_ttft_ms", ".1f"),
    ("ratio", "ratio", "mean_ttft_ms", ".3f"),
    ("median ITL ms", "value", "median_itl_ms", ".1f"),
    ("ratio", "ratio", "median_itl_ms", ".3f"),
    ("p99 ITL ms", "value", "p99_itl_ms", ".1f"),
    ("hit rate", "engram", "cache_hit_rate", ".3f"),
    ("wait p99 ms", "engram", "prefetch_wait_p99_ms", ".3f"),
)


def compare_markdown(comparison: dict) -> str:
    """The comparison as a Markdown table: median [min, max] over rounds; ratios
    are to the base variant in the same round."""
    head = ["variant"] + [c[0] for c in _TABLE_COLUMNS] + ["failed"]
    lines = [
        f"Ratios to `{comparison['base']}`, paired by round; cells are median "
        f"[min, max] over {comparison['rounds']} rounds.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, entry in comparison["summary"].items():
        cells = [_cell(entry[section].get(key), fmt) for _, section, key, fmt in _TABLE_COLUMNS]
        lines.append("| " + " | ".join([f"`{name}`"] + cells + [str(entry["failed"])]) + " |")
    lines += ["", "Server command per variant:", ""]
    lines += [f"- `{name}`: `{' '.join(cmd)}`" for name, cmd in comparison["variants"].items()]
    return "\n".join(lines) + "\n"
