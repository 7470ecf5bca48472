#!/usr/bin/env python3
"""Everything engram-serve can measure on a lent GPU, in one command: `make gpu-check`.

The machine has torch, CUDA, triton and cupy, no package registry and no internet, so the models
are made there (bench/synthetic.py: random weights, numbered tokens, tables in memory). Stages,
each written to the JSON as soon as it is done, so a timeout still leaves what was measured:

1. environment: GPU, driver, torch, CUDA, triton, cupy;
2. tests: `pytest -m cuda` (tests/cuda: CUDA against the CPU, bf16 against fp32, batched against
   alone, graphs against eager);
3. per backbone shape (SmolLM2-135M, Llama-3-8B; bfloat16), one engine: decode tokens/s at batch
   1, 16, 64 and 256 without Engram, then with two Engram layers whose tables sit in HBM, in
   pinned host DRAM read by the GPU through UVA, and in pinned host DRAM copied through staging
   (the 8B shape's tables hold 50 GB); each eager and with CUDA graphs (staging: eager only); the
   throughput ratio against no Engram in the same mode and the compute stream's stall at each
   Engram layer (CUDA events).

`--smoke` runs the same code on this CPU with the device stand-in (offload.device) and tiny
shapes, which is how tests/test_gpu_check.py keeps the script working between GPU sessions.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.synthetic import engram_config, engram_memory, random_model  # noqa: E402
from engram_runtime.cuda_graphs import DecodeGraphs  # noqa: E402
from engram_runtime.engine_config import EngineConfig  # noqa: E402
from engram_runtime.engine import LLMEngine  # noqa: E402
from engram_runtime.sampling import SamplingParams  # noqa: E402
from offload.device import ComputeDevice  # noqa: E402

GB = 10**9
PLANS = {  # shape: (batches, Engram layers, bytes of table per layer, max_model_len)
    "smollm2-135m": ([1, 16, 64, 256], [1, 15], 4 * GB, 512),
    "llama3-8b": ([1, 16, 64, 256], [1, 15], 25 * GB, 512),
}
SMOKE = {"tiny": ([1, 4], [1, 2], 2 * 10**6, 64)}
MEMORIES = [("hbm", "device", "uva"), ("host_uva", "host", "uva"), ("host_staging", "host", "staging")]


class Report:
    """The JSON, rewritten after every stage."""

    def __init__(self, path: Path):
        self.path, self.data = path, {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}

    def stage(self, name: str, fn, *args):
        t0 = time.perf_counter()
        try:
            result = {"ok": True, **fn(*args)}
        except Exception as exc:  # noqa: BLE001 - a failed stage is data; the next one still runs
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["stages"][name] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")
        print(f"[{name}] {'ok' if result['ok'] else 'FAILED: ' + result['error']} ({result['seconds']} s)", flush=True)
        return result


def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    for name in ("triton", "cupy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(gpu_memory_gib=round(total / 2**30, 1), gpu_free_gib=round(free / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability())))
    return info


def cuda_tests(timeout: int) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/cuda"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return {"returncode": done.returncode, "passed": done.returncode == 0, "tail": done.stdout[-4000:]}


class DecodeSteps:
    """The engine's step observer: the durations of steps of `batch` tokens (decode steps)."""

    def __init__(self):
        self.batch, self.times = 0, []

    def __call__(self, seconds: float, tokens: int) -> None:
        if tokens == self.batch:
            self.times.append(seconds)


def decode_rate(engine: LLMEngine, steps_seen: DecodeSteps, batch: int, steps: int, warmup: int,
                prompt_len: int) -> dict:
    """Decode tokens/s of `batch` sequences after their prefill, and each Engram layer's mean stall
    per wait (the compute stream's, timed by CUDA events)."""
    steps_seen.batch, steps_seen.times = batch, []
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=warmup + steps, temperature=0, ignore_eos=True)
    before = engine.table_stats.snapshot() if engine.table_stats else {}
    for _ in range(batch):
        prompt = torch.randint(0, engine.model_config.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(prompt, params, lambda out: None)
    engine.run_until_done()
    decode = steps_seen.times[warmup:]
    step = statistics.median(decode)
    out = {"batch": batch, "step_ms": round(step * 1e3, 3), "tokens_per_s": round(batch / step, 1)}
    if engine.table_stats is not None:
        after = engine.table_stats.snapshot()
        out["stall_ms_per_wait"] = {lid: round((s["wait_seconds_total"] - before[lid]["wait_seconds_total"])
                                               / max(1, s["waits"] - before[lid]["waits"]) * 1e3, 4)
                                    for lid, s in after.items()}
    return out


def modes(engine: LLMEngine, graphable: bool):
    """("graphs", with decode graphs captured now) where they apply, then ("eager", without)."""
    if graphable:
        t0 = time.perf_counter()
        engine.graphs = DecodeGraphs(engine.runner, engine.max_num_seqs, engine.engram)
        yield "graphs", time.perf_counter() - t0
    engine.graphs = None
    yield "eager", 0.0


def backbone(shape: str, plan, device: ComputeDevice, smoke: bool) -> dict:
    batches, layer_ids, table_bytes, max_len = plan
    steps, warmup = (4, 1) if smoke else (32, 4)
    loaded = random_model(shape, device.torch_device, torch.bfloat16)
    config = EngineConfig(dtype="bfloat16", max_num_seqs=max(batches), max_model_len=max_len,
                          max_num_batched_tokens=max(batches) * 32, enforce_eager=True, gpu_memory_utilization=0.3)
    engine = LLMEngine(config, loaded, device=device)
    steps_seen = DecodeSteps()
    engine.add_step_observer(steps_seen)
    runs: dict[str, dict] = {}

    def measure(name: str, graphable: bool) -> None:
        for mode, capture_s in modes(engine, graphable):
            runs[f"{name}/{mode}"] = {"capture_s": round(capture_s, 2), "by_batch": [
                decode_rate(engine, steps_seen, b, steps, warmup, 32) for b in batches]}
            print(f"  {shape} {name}/{mode}: " + ", ".join(f"b{r['batch']} {r['tokens_per_s']} tok/s"
                                                          for r in runs[f"{name}/{mode}"]["by_batch"]), flush=True)

    measure("no_engram", True)
    cfg = engram_config(table_bytes, layer_ids)
    host_rows = None
    for name, placement, host_read in MEMORIES:
        t0 = time.perf_counter()
        memory, host_rows = engram_memory(cfg, loaded, device, placement, engine.runner.cache_slots, engine.runner.dtype,
                                          host_read, rows=host_rows if placement == "host" else None)
        engine.attach_engram(memory)
        runs[f"{name}/setup_s"] = round(time.perf_counter() - t0, 2)
        measure(name, memory.graphable)
        engine.attach_engram(None)
        if device.cuda_primitives:
            torch.cuda.empty_cache()
    for key, run in list(runs.items()):
        base = runs.get("no_engram/" + key.split("/")[-1]) if isinstance(run, dict) else None
        if base and not key.startswith("no_engram"):
            run["ratio_vs_no_engram"] = [round(b["step_ms"] / r["step_ms"], 4)
                                         for b, r in zip(base["by_batch"], run["by_batch"])]
    engine.shutdown()
    return {"max_num_seqs": engine.max_num_seqs, "table_gb_per_layer": table_bytes / GB, "layers": layer_ids,
            "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpu_check.json")
    p.add_argument("--smoke", action="store_true", help="this CPU, the device stand-in, tiny shapes")
    p.add_argument("--shapes", nargs="*", default=None, help="backbone shapes to run (default: all)")
    p.add_argument("--tests-timeout", type=int, default=150)
    args = p.parse_args(argv)
    report = Report(args.out)
    report.stage("environment", environment)
    plans = SMOKE if args.smoke else PLANS
    if not args.smoke:
        if not torch.cuda.is_available():
            print("no GPU: use --smoke for the CPU stand-in", file=sys.stderr)
            return 2
        report.stage("tests", cuda_tests, args.tests_timeout)
    device = ComputeDevice.portable_cpu() if args.smoke else ComputeDevice("cuda")
    for shape in args.shapes or plans:
        report.stage(f"decode/{shape}", backbone, shape, plans[shape], device, args.smoke)
    return 0 if all(s["ok"] for s in report.data["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
