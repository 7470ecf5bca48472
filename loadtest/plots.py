"""PNG plots of a comparison, readable at a glance.

Throughput: one bar per variant at the median ratio to the base, whiskers from
the worst to the best round, each round's ratio as a dot (with many short rounds
the spread is the message), a line at 1.0 (parity).  Latency: empirical CDFs
of TTFT and inter-token latency pooled over rounds, one line per variant, so a
shift of the whole distribution and a heavier tail are both visible.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def throughput_ratio_plot(comparison: dict, path: Path, key: str = "output_throughput") -> None:
    summary = comparison["summary"]
    names = list(summary)
    med = np.array([summary[n]["ratio"][key]["median"] for n in names])
    lo = med - np.array([summary[n]["ratio"][key]["min"] for n in names])
    hi = np.array([summary[n]["ratio"][key]["max"] for n in names]) - med
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    bars = ax.bar(names, med, yerr=[lo, hi], capsize=6, color="tab:blue", alpha=0.8)
    jitter = np.random.default_rng(0)
    for i, n in enumerate(names):
        if n == comparison["base"]:  # 1.0 in every round
            continue
        rounds = summary[n]["ratio"][key]["rounds"]
        ax.scatter(i + jitter.uniform(-0.25, 0.25, len(rounds)), rounds, s=10, color="black", alpha=0.5, zorder=3)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    for bar, m, top in zip(bars, med, med + hi):  # label above the whisker
        ax.annotate(f"{m:.3f}", (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 4), textcoords="offset points", ha="center", fontsize=9)
    low = min(0.8, float((med - lo).min()) - 0.02)
    ax.set_ylim(max(0.0, low), max(1.1, 1.08 * float((med + hi).max())))
    ax.set_ylabel(f"{key} / {comparison['base']}")
    ax.set_title(f"{key.replace('_', ' ')} relative to '{comparison['base']}'\n"
                 f"(median, whiskers min-max, dots: {comparison['rounds']} round(s))", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ecdf(ax, values_ms: list[float], label: str) -> None:
    if not values_ms:
        return
    x = np.sort(np.asarray(values_ms))
    ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)


def latency_plot(comparison: dict, path: Path) -> None:
    """ECDFs; the x axis stops at the largest 99.5th percentile of any variant so a
    few outliers do not squash the body of the distributions (the title says so)."""
    fig, (ax_ttft, ax_itl) = plt.subplots(1, 2, figsize=(11, 4))
    xmax = {ax_ttft: 0.0, ax_itl: 0.0}
    for name, runs in comparison["runs"].items():
        ok = [(r, i) for r in runs for i, err in enumerate(r["errors"]) if not err]
        for ax, values in ((ax_ttft, [1000 * r["ttfts"][i] for r, i in ok]),
                           (ax_itl, [1000 * x for r, i in ok for x in r["itls"][i]])):
            _ecdf(ax, values, name)
            if values:
                xmax[ax] = max(xmax[ax], float(np.percentile(values, 99.5)))
    for ax, title in ((ax_ttft, "time to first token"), (ax_itl, "inter-token latency")):
        if xmax[ax] > 0:
            ax.set_xlim(0, 1.05 * xmax[ax])
            title += ", x up to p99.5"
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if ax is ax_ttft else "fraction of tokens")
        ax.set_title(f"{title} (CDF, all rounds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
