"""Offload benchmark: gather throughput vs the machine's random-read limits, cache hit rate vs size,
prefetch overlap.  ``python -m bench.offload [--gb 8]`` -> bench/results/offload.json (+ .png).

1. Writes a default-layout Engram checkpoint for the default backbone (engram-init's layout: layers
   1 and 15, 16 heads of 64-dim bf16 rows each) whose two tables total --gb GB, materialised
   (random values, not sparse), then measures, in this one process:
   - the DRAM random-read limit: numpy.take of random 128-byte rows from the resident table
     (the bare primitive, no dedup/stats/dequantise), vs TableSet host gathers;
   - the disk random-read limit: 4 KiB preads at random offsets after evicting the file from the
     page cache (queue depth 1 and 8), vs cold and warm mmap gathers (one page fault per row,
     8 reader threads).
2. Cache hit rate vs cache size for the shipped policy (set-associative, frequency admission)
   against LRU, direct-mapped and a static top-k oracle, on Zipfian n-gram traffic and on real text
   hashed by engram_runtime's NgramHasher (SmolLM2 tokenizer, Python stdlib sources as text).
3. Decode throughput of the default backbone (SmolLM2-135M) with Engram at layers 1 and 15, batch 1
   and 32: host + prefetch vs the plain in-process tensor, mmap (cold start) + DRAM row cache vs
   host, prefetch on / off, and the time the forward waited for rows per step (p50 / p99).

Only run it for final numbers on a quiet machine; the JSON records the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from offload.cache import POLICIES, RowCache
from offload.store import TableSet

if TYPE_CHECKING:
    from engram_runtime.checkpoint import EngramCheckpoint

LAYERS = (1, 15)
HEADS, HEAD_DIM, ROW_BYTES = 16, 64, 128
RESULTS = Path(__file__).parent / "results"


@dataclass
class BenchConfig:
    gb: float = 0.25                 # total size of the two tables in GB (1e9 bytes)
    dir: str = "/var/tmp/engram-bench-offload"
    keep: bool = False               # keep the table files for the next run
    seconds: float = 2.0             # per throughput measurement
    batch_tokens: int = 32           # tokens per step: rows per gather = batch_tokens * HEADS
    traffic_tokens: int = 100_000    # tokens per hit-rate stream
    zipf_s: float = 1.0
    ngram_types: int = 10_000_000
    steps: int = 64                  # decode steps per configuration and round
    prompt_tokens: int = 16
    cache_rows: int = 1 << 18        # DRAM row cache per mmap table in the decode runs
    torch_threads: int = 0           # 0: torch's default


def _timed_loop(fn, batches, seconds: float) -> tuple[float, int]:
    """Run fn over batches (cycling) for about `seconds`; return (rows/s, calls)."""
    done_rows, calls, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls == 0:
        batch = batches[calls % len(batches)]
        fn(batch)
        done_rows += batch.size
        calls += 1
    return done_rows / (time.perf_counter() - t0), calls


def make_checkpoint(cfg: BenchConfig) -> EngramCheckpoint:
    """engram-init's default layout for the default backbone, bf16 tables totalling --gb; the one
    already in --dir is reused when it has that layout."""
    from engram_runtime.checkpoint import backbone_info, load_checkpoint
    from engram_runtime.checkpoint_format import EngramCheckpointError
    from engram_runtime.checkpoint_init import InitOptions, engram_init
    options = InitOptions(out=Path(cfg.dir) / "ckpt", table_gb=cfg.gb / len(LAYERS), dtype="bfloat16", force=True)
    try:
        ckpt = load_checkpoint(options.out)
        if ckpt.config == options.config(backbone_info(None)):
            return ckpt
    except EngramCheckpointError:
        pass
    engram_init(options)
    return load_checkpoint(options.out)


def evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_random_reads(path: Path, seconds: float, queue_depth: int) -> float:
    """4 KiB preads at random page offsets of a file just evicted from the page cache: reads/s."""
    evict_from_page_cache(path)
    pages = path.stat().st_size // 4096
    rng = np.random.default_rng(queue_depth)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    count, t0 = 0, time.perf_counter()

    def reader(seed: int) -> int:
        local, r = 0, np.random.default_rng(seed)
        while time.perf_counter() - t0 < seconds:
            for page in r.integers(0, pages, 64):
                os.pread(fd, 4096, int(page) * 4096)
            local += 64
        return local

    with ThreadPoolExecutor(queue_depth) as pool:
        count = sum(pool.map(reader, rng.integers(0, 1 << 30, queue_depth)))
    os.close(fd)
    return count / (time.perf_counter() - t0)


def _measure_host(cfg: BenchConfig, ckpt, uniform: list[np.ndarray]) -> dict:
    """The host tier against np.take of the same rows from the same memory (the DRAM limit)."""
    host = TableSet.open(ckpt.path, ckpt.tables_manifest, placement="host")
    raw = host[1].resident.view(torch.uint8).numpy()
    staging = np.empty((len(uniform[0]), ROW_BYTES), np.uint8)
    dram, _ = _timed_loop(lambda b: np.take(raw, b, axis=0, out=staging), uniform, cfg.seconds)
    rows, _ = _timed_loop(host[1].gather, uniform, cfg.seconds)
    return {"dram_limit_rows_per_s": dram, "host_rows_per_s": rows, "host_vs_dram_limit": rows / dram}


def measure_gathers(cfg: BenchConfig, ckpt) -> dict:
    """Random uniform rows: the worst case for every tier (no locality, no cache)."""
    rng = np.random.default_rng(0)
    num_rows = ckpt.tables_manifest["1"]["shape"][0]
    uniform = [rng.integers(0, num_rows, cfg.batch_tokens * HEADS) for _ in range(256)]
    out: dict = {"rows_per_gather": cfg.batch_tokens * HEADS}
    out.update(_measure_host(cfg, ckpt, uniform))  # the host copy is freed before the disk reads
    path = ckpt.table_path(1)
    out["disk_limit_qd1_reads_per_s"] = disk_random_reads(path, cfg.seconds, 1)
    out["disk_limit_qd8_reads_per_s"] = disk_random_reads(path, cfg.seconds, 8)
    evict_from_page_cache(path)
    mm = TableSet.open(ckpt.path, ckpt.tables_manifest, placement="mmap")
    out["mmap_cold_rows_per_s"], calls = _timed_loop(mm[1].gather, uniform, cfg.seconds)
    out["mmap_cold_gathers"] = calls
    out["mmap_cold_vs_disk_qd1"] = out["mmap_cold_rows_per_s"] / out["disk_limit_qd1_reads_per_s"]
    out["mmap_cold_vs_disk_qd8"] = out["mmap_cold_rows_per_s"] / out["disk_limit_qd8_reads_per_s"]
    for batch in uniform:
        mm[1].gather(batch)
    out["mmap_warm_rows_per_s"], _ = _timed_loop(mm[1].gather, uniform, cfg.seconds)
    out["mmap_warm_vs_dram_limit"] = out["mmap_warm_rows_per_s"] / out["dram_limit_rows_per_s"]
    return out


def zipf_stream(cfg: BenchConfig, sizes: np.ndarray, offsets: np.ndarray, tokens: int | None = None,
                seed: int = 0) -> list[np.ndarray]:
    """Steps of [batch_tokens, HEADS] global rows: Zipf(s) n-gram ids hashed into each head."""
    rng = np.random.default_rng(seed)
    s, v = cfg.zipf_s, cfg.ngram_types
    u = rng.random(tokens or cfg.traffic_tokens)
    ranks = np.floor(v ** u) if s == 1.0 else np.floor(((v ** (1 - s) - 1) * u + 1) ** (1 / (1 - s)))
    ngram = rng.permutation(v + 1)[ranks.astype(np.int64)]  # hot n-grams get arbitrary ids
    mult = rng.integers(1 << 20, 1 << 30, HEADS) | 1
    rows = (ngram[:, None] * mult[None, :]) % sizes[None, :] + offsets[None, :]
    return [rows[i:i + cfg.batch_tokens] for i in range(0, len(rows), cfg.batch_tokens)]


def stdlib_tokens(tokenizer, n: int) -> list[int]:
    """n token ids of real text: the Python standard library's sources."""
    import sysconfig
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tokenizer(path.read_text(errors="ignore"), add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            break
    return ids[:n]


def text_stream(cfg: BenchConfig, hasher, tokenizer) -> list[np.ndarray]:
    """Layer-1 rows of real text hashed by engram_runtime's NgramHasher."""
    ids = np.asarray(stdlib_tokens(tokenizer, cfg.traffic_tokens))[None, :]
    rows = hasher.hash(ids)[LAYERS[0]][0] + hasher.head_offsets[LAYERS[0]]
    return [rows[i:i + cfg.batch_tokens] for i in range(0, len(rows), cfg.batch_tokens)]


def hit_rates(batches: list[np.ndarray], capacity: int) -> dict[str, float]:
    """Hit rate of each policy; a lookup hits when its row was resident before its step."""
    total = sum(b.size for b in batches)
    ours = {f"{policy}_8way": RowCache(capacity, 1, torch.float32, policy=policy) for policy in POLICIES}
    lru: OrderedDict = OrderedDict()
    direct = np.full(capacity, -1, np.int64)
    hits = dict.fromkeys((*ours, "lru_fully_associative", "direct_mapped"), 0)
    for batch in batches:
        unique, counts = np.unique(batch, return_counts=True)
        for name, cache in ours.items():
            hit, _ = cache.lookup(unique, counts)
            hits[name] += int(counts[hit].sum())
            cache.admit(unique[~hit], torch.zeros(int((~hit).sum()), 1))
        hits["lru_fully_associative"] += int(sum(c for r, c in zip(unique.tolist(), counts.tolist()) if r in lru))
        for r in unique.tolist():
            lru[r] = None
            lru.move_to_end(r)
        while len(lru) > capacity:
            lru.popitem(last=False)
        slot = unique % capacity
        hits["direct_mapped"] += int(counts[direct[slot] == unique].sum())
        direct[slot] = unique
    _, counts = np.unique(np.concatenate(batches), return_counts=True)
    hits["static_topk_oracle"] = int(np.sort(counts)[::-1][:capacity].sum())
    return {k: v / total for k, v in hits.items()}


def measure_cache(cfg: BenchConfig, ckpt, hasher, tokenizer) -> dict:
    offsets = ckpt.head_offsets[LAYERS[0]]
    sizes = np.diff(np.r_[offsets, ckpt.tables_manifest[str(LAYERS[0])]["shape"][0]])
    table_rows = int(sizes.sum())
    streams = {"zipf": zipf_stream(cfg, sizes, offsets), "hashed_text": text_stream(cfg, hasher, tokenizer)}
    out = {}
    for name, batches in streams.items():
        batches = [b.ravel() for b in batches]
        lookups = sum(b.size for b in batches)
        distinct = len(np.unique(np.concatenate(batches)))
        out[name] = {"lookups": lookups, "distinct_rows": distinct, "table_rows": table_rows, "by_capacity": {}}
        for capacity in sorted({c for c in (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18) if c < distinct}):
            out[name]["by_capacity"][capacity] = hit_rates(batches, capacity)
            print(name, capacity, out[name]["by_capacity"][capacity])
    return out


def _wait_seconds(tables: TableSet) -> float:
    """Seconds the forward has waited for rows so far, over every layer."""
    return sum(s["wait_seconds_total"] for s in tables.stats.snapshot().values())


def measure_decode(cfg: BenchConfig, ckpt, hasher, loaded) -> dict:
    """Decode steps of the default backbone with Engram at layers 1 and 15, per table configuration.

    On CPU a 'device' table is the same memory as 'host', so host tables gathered inline ARE the
    plain in-process tensor baseline. Configurations alternate (A B C D D C B A) so drift in machine
    load hits all of them alike; the mmap table starts evicted from the page cache.
    """
    from engram_runtime.engram_runner import EngramRunner
    from engram_runtime.model_runner import Chunk, ModelRunner
    runner = ModelRunner(loaded.config, loaded.state_dict, torch.float32, 32,
                         cfg.prompt_tokens + 2 * cfg.steps + 8)
    layers = ckpt.build_layers()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers.values():  # a fresh checkpoint's value projection is zero
            layer.value_proj.weight.copy_(torch.randn(layer.value_proj.weight.shape, generator=gen) * 0.05)
    text = stdlib_tokens(loaded.tokenizer, 32 * cfg.prompt_tokens)
    prompts = [text[i * cfg.prompt_tokens:(i + 1) * cfg.prompt_tokens] for i in range(32)]
    host = TableSet.open(ckpt.path, ckpt.tables_manifest, placement="host")
    for lid in layers:
        evict_from_page_cache(ckpt.table_path(lid))
    mapped = TableSet.open(ckpt.path, ckpt.tables_manifest, placement="mmap", cache_rows=cfg.cache_rows)
    configs = {"plain_tensor": (host, False), "host_prefetch": (host, True),
               "mmap_cache_prefetch": (mapped, True), "mmap_cache_inline": (mapped, False)}
    engrams = {name: EngramRunner(layers, hasher, tables, runner.num_slots, runner.dtype, prefetch)
               for name, (tables, prefetch) in configs.items()}
    out: dict = {"cache_rows": cfg.cache_rows}
    for batch in (1, 32):
        step_s = {name: [] for name in configs}
        wait_s = {name: [] for name in configs}
        for name in [*configs, *reversed(configs)]:
            tables = configs[name][0]
            ids = [list(p) for p in prompts[:batch]]
            chunks = [Chunk(b, ids[b], 0) for b in range(batch)]
            with torch.no_grad():
                for step in range(cfg.steps + 1):
                    waited = _wait_seconds(tables)
                    t0 = time.perf_counter()
                    logits = runner.forward(chunks, engrams[name].submit(chunks, ids))
                    for b, token in enumerate(logits.argmax(-1).tolist()):
                        ids[b].append(token)
                    if step:  # decode steps only, not the prefill
                        step_s[name].append(time.perf_counter() - t0)
                        wait_s[name].append(_wait_seconds(tables) - waited)
                    chunks = [Chunk(b, ids[b][-1:], len(ids[b]) - 1) for b in range(batch)]
        res = {}
        for name in configs:
            warm = len(step_s[name]) // 2 // 5  # skip the first 20 % of each round
            steps = np.array(step_s[name][warm:cfg.steps] + step_s[name][cfg.steps + warm:])
            waited = np.array(wait_s[name][warm:cfg.steps] + wait_s[name][cfg.steps + warm:])
            res[name] = {"step_mean_ms": 1e3 * steps.mean(), "step_p50_ms": 1e3 * float(np.median(steps)),
                         "tokens_per_s": batch / steps.mean(),
                         "wait_p50_ms": 1e3 * float(np.percentile(waited, 50)),
                         "wait_p99_ms": 1e3 * float(np.percentile(waited, 99)),
                         "wait_share_of_step": float(waited.sum() / steps.sum()),
                         "first_round_first_steps_ms": [1e3 * x for x in step_s[name][:5]]}
        res["ratios"] = {
            "host_prefetch_vs_plain_tensor": res["host_prefetch"]["tokens_per_s"] / res["plain_tensor"]["tokens_per_s"],
            "mmap_cache_prefetch_vs_host_prefetch":
                res["mmap_cache_prefetch"]["tokens_per_s"] / res["host_prefetch"]["tokens_per_s"],
        }
        out[f"batch{batch}"] = res
        print(json.dumps(res, indent=1))
    out["mmap_cache_hit_rate"] = {layer: st["cache_hit_rate"] for layer, st in mapped.stats.snapshot().items()}
    for engram in engrams.values():  # each closes its tables too; closing a TableSet twice is harmless
        engram.close()
    return out


def plot(cache: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(cache), figsize=(6 * len(cache), 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], cache.items()):
        caps = sorted(res["by_capacity"], key=int)
        for policy in next(iter(res["by_capacity"].values())):
            ax.plot(caps, [res["by_capacity"][c][policy] for c in caps], marker="o", label=policy)
        ax.set_xscale("log")
        ax.set(title=f"{name}: {res['lookups']} lookups", xlabel="cache rows", ylabel="hit rate")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.offload", description=__doc__.splitlines()[0])
    for name, default in asdict(BenchConfig()).items():
        if type(default) is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    parser.add_argument("--skip", nargs="*", default=[], choices=["gather", "cache", "decode"])
    args = vars(parser.parse_args(argv))
    skip = args.pop("skip")
    cfg = BenchConfig(**args)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    from engram_runtime.compression import CompressedTokenizer
    from engram_runtime.hashing import NgramHasher
    from engram_runtime.weights import default_model_path, load_model
    result = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                                                 "torch_threads": torch.get_num_threads()}}
    loaded = load_model(default_model_path())
    try:
        ckpt = make_checkpoint(cfg)
        hasher = NgramHasher(ckpt.config, CompressedTokenizer.from_tokenizer(loaded.tokenizer))
        result["tables"] = {k: {"nbytes": v["nbytes"], "rows": v["shape"][0], "dtype": v["dtype"]}
                            for k, v in ckpt.tables_manifest.items()}
        if "gather" not in skip:
            result["gather"] = measure_gathers(cfg, ckpt)
            print(json.dumps(result["gather"], indent=1))
        if "cache" not in skip:
            result["cache"] = measure_cache(cfg, ckpt, hasher, loaded.tokenizer)
        if "decode" not in skip:
            result["decode"] = measure_decode(cfg, ckpt, hasher, loaded)
    finally:
        if not cfg.keep:
            shutil.rmtree(cfg.dir, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "offload.json").write_text(json.dumps(result, indent=2) + "\n")
    if "cache" in result:
        plot(result["cache"], RESULTS / "offload.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
