"""bench package: the benchmarks behind `make bench` (see bench/__main__.py)."""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path


def load_before_run() -> float:
    """The 1-minute load average, with a warning on stderr when the machine is busy: a figure
    taken while something else computes is void, and the JSON records the load beside it."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: this machine is busy, "
              "figures taken now are not valid results", file=sys.stderr)
    return load


def write_result(out: str | Path, report: dict) -> None:
    """The benchmark's JSON at `out` (its folder made), and a line saying where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


def median_seconds(fn, reps: int) -> float:
    """Median wall time of `reps` calls of fn(), after one untimed call (caches, lazy set-up)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
