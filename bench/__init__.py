"""bench package: the benchmarks behind `make bench` (see bench/__main__.py)."""
from __future__ import annotations

import os
import sys


def load_before_run() -> float:
    """The 1-minute load average, with a warning on stderr when the machine is busy: a figure
    taken while something else computes is void, and the JSON records the load beside it."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: this machine is busy, "
              "figures taken now are not valid results", file=sys.stderr)
    return load
