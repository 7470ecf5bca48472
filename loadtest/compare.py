"""Side-by-side comparison of server configurations on one workload.

Each configuration ("variant") is a server command line.  The identical request
list is sent to every variant in interleaved rounds (A B C A B C ...), and every
figure is reported as a ratio to the first variant *within the same round*:
on a shared machine a slow minute then hits A, B and C alike and cancels in the
ratio, and min / median / max over rounds shows how much noise remains.
By default servers are started once per variant, all at once, and stay up (idle
servers cost memory, not CPU); ``restart_each_round`` starts one server at a time
instead, for tables too large to hold several copies in RAM.
"""
from __future__ import annotations

import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.process import ServerProcess
from loadtest.runner import RunConfig, run
from loadtest.workload import SampleRequest

# Figures compared across variants; True when higher is better.
COMPARED = {
    "output_throughput": True,
    "request_throughput": True,
    "total_token_throughput": True,
    "mean_ttft_ms": False,
    "median_ttft_ms": False,
    "p99_ttft_ms": False,
    "mean_tpot_ms": False,
    "mean_itl_ms": False,
    "median_itl_ms": False,
    "p99_itl_ms": False,
    "mean_e2el_ms": False,
}
ENGRAM_FIGURES = ("cache_hit_rate", "prefetch_wait_p50_ms", "prefetch_wait_p99_ms",
                  "prefetch_wait_share_of_step", "rows_gathered_per_s", "bytes_gathered_per_s")
# Per-request lists kept for the distribution plots; the rest stays out of compare.json.
KEPT_LISTS = ("ttfts", "itls", "output_lens", "errors")

# name -> server arguments; {engram}, {engram_fp8} and {cache_rows} are filled in.
DEFAULT_VARIANTS = {
    "no-engram": "--no-engram",
    "ram": "--engram {engram} --table-placement host",
    "ram-no-prefetch": "--engram {engram} --table-placement host --no-prefetch",
    "mmap-cache": "--engram {engram} --table-placement mmap --cache-rows {cache_rows}",
    "fp8": "--engram {engram_fp8} --table-placement host",
}


@dataclass
class Variant:
    """One configuration: ``args`` appended to the comparison's server command, or, for another
    server altogether (a peer such as vLLM or llama.cpp's), ``cmd``: its whole command line,
    with ``env`` added to its environment and ``process`` the ServerProcess (sub)class that
    starts it and knows when it is ready."""

    name: str
    args: list[str] = field(default_factory=list)
    cmd: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: type[ServerProcess] = ServerProcess

    def command(self, server_cmd: list[str], server_args: list[str]) -> list[str]:
        if self.cmd is not None:
            return list(self.cmd)
        return list(server_cmd) + list(server_args) + list(self.args)

    @classmethod
    def parse(cls, spec: str, fill: dict[str, str]) -> "Variant":
        """``NAME=ARGS`` (ARGS shell-quoted, placeholders in braces)."""
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"variant {spec!r}: expected NAME=SERVER ARGS")
        try:
            args = [a.format(**fill) for a in shlex.split(rest)]
        except KeyError as exc:
            raise ValueError(f"variant {name!r} uses {{{exc.args[0]}}}, which is not set "
                             f"(known: {', '.join(sorted(fill)) or 'none'})") from None
        return cls(name.strip(), args)


@dataclass
class CompareConfig:
    variants: list[Variant]
    server_cmd: list[str]
    out_dir: Path
    rounds: int = 3
    server_args: list[str] = field(default_factory=list)  # common to every variant
    restart_each_round: bool = False
    startup_timeout: float = 900.0

    def __post_init__(self) -> None:
        if len(self.variants) < 2:
            raise ValueError("compare needs at least two variants")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


def _spread(values: list[float]) -> dict[str, float | list[float]]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "rounds": values}


def paired_ratio(runs: dict[str, list[dict]], num: str, den: str, key: str) -> dict | None:
    """``num``'s figure over ``den``'s, round by round (both ran in the same round, back
    to back), as min / median / max; None when ``den`` has no non-zero value."""
    ratios = [a[key] / b[key] for a, b in zip(runs[num], runs[den]) if b[key]]
    return _spread(ratios) if ratios else None


def aggregate(runs: dict[str, list[dict]], base: str) -> dict[str, dict]:
    """Per variant and figure: values over rounds, and ratios to ``base`` paired by round.

    Ratios are oriented so > 1 means 'as the metric reads' (a throughput ratio of
    0.97 is a 3% loss; a TTFT ratio of 1.05 is 5% slower)."""
    out: dict[str, dict] = {}
    for name, results in runs.items():
        entry: dict[str, dict] = {"value": {}, "ratio": {}, "engram": {}}
        for key in COMPARED:
            vals = [r[key] for r in results]
            entry["value"][key] = _spread(vals)
            ratio = paired_ratio(runs, name, base, key)
            if ratio:
                entry["ratio"][key] = ratio
        for key in ENGRAM_FIGURES:
            vals = [r["engram"][key] for r in results if key in r.get("engram", {})]
            if vals:
                entry["engram"][key] = _spread(vals)
        entry["failed"] = sum(r["failed"] for r in results)
        out[name] = entry
    return out


def _run_round(cfg: CompareConfig, servers: dict[str, ServerProcess], variant: Variant,
               rnd: int, requests: list[SampleRequest], run_kwargs: dict) -> dict:
    srv = servers.get(variant.name)
    own = srv is None
    if own:
        srv = _server(cfg, variant, rnd)
        srv.start()
    try:
        print(f"[round {rnd + 1}/{cfg.rounds}] {variant.name} @ {srv.base_url}")
        return run(RunConfig(base_url=srv.base_url, **run_kwargs), requests)
    finally:
        if own:
            srv.stop()


def _server(cfg: CompareConfig, variant: Variant, rnd: int | None) -> ServerProcess:
    suffix = "" if rnd is None else f".round{rnd + 1}"
    return variant.process(variant.command(cfg.server_cmd, cfg.server_args),
                           cfg.out_dir / "logs" / f"{variant.name}{suffix}.log",
                           startup_timeout=cfg.startup_timeout, env=variant.env)


def run_compare(cfg: CompareConfig, requests: list[SampleRequest], run_kwargs: dict,
                meta: dict | None = None) -> dict:
    """Run every round, return the comparison (without writing anything)."""
    servers: dict[str, ServerProcess] = {}
    runs: dict[str, list[dict]] = {v.name: [] for v in cfg.variants}
    try:
        if not cfg.restart_each_round:
            for v in cfg.variants:  # all load at once, then wait for each
                servers[v.name] = _server(cfg, v, None)
                print(f"starting {v.name}: {' '.join(servers[v.name].cmd)}")
                servers[v.name].launch()
            for srv in servers.values():
                srv.wait_healthy()
        for rnd in range(cfg.rounds):
            for v in cfg.variants:
                result = _run_round(cfg, servers, v, rnd, requests, run_kwargs)
                runs[v.name].append(
                    {k: val for k, val in result.items()
                     if not isinstance(val, list) or k in KEPT_LISTS})
    finally:
        for srv in servers.values():
            srv.stop()
    base = cfg.variants[0].name
    return {
        "base": base,
        "rounds": cfg.rounds,
        "variants": {v.name: v.command(cfg.server_cmd, cfg.server_args) for v in cfg.variants},
        "workload": meta or {},
        "summary": aggregate(runs, base),
        "runs": runs,
    }
