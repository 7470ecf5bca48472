"""`make bench`: every benchmark, one after another, each writing bench/results/<name>.json.

They run in sequence, never side by side: each one's ratios are measured within
its own process, and a second benchmark running alongside would void them.
`python -m bench NAME ...` runs only the named ones; each is also runnable alone
(`python -m bench.generate --help`) with its own options.
"""
from __future__ import annotations

import importlib
import sys

from bench import load_before_run

BENCHMARKS = ("hashing", "generate", "quantization", "warm_up", "offload", "engram_step", "overhead", "scaleout", "peers",
              "train")


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    load_before_run()
    for name in names:
        print(f"=== bench.{name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
