"""`--data-parallel-size 2` with placement shared, against real processes: both workers give the
greedy text of a lone `host` server and map one copy of the tables (the copy's Pss summed over
the workers is one table), connections to the one port reach both workers (x-engram-worker and
each worker's own /metrics), and after kill -9 of a worker the port keeps answering while the
supervisor restarts it, the restart attaching to the copy in place rather than writing one."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from engram_runtime.checkpoint_init import InitOptions, engram_init
from loadtest.process import ServerProcess, engram_serve_cmd
from offload.shared import DIR_ENV, SharedCopy
from offload.tablefile import file_sha256
from loadtest.memory import mapping_kb

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
COMMON = ["--max-model-len", "64", "--max-num-seqs", "2", "--shutdown-timeout", "5"]


def memory_checkpoint(path: Path) -> Path:
    """A tiny checkpoint (two 4 MB tables) whose value projections are not zero, so its tables
    change the greedy text (a fresh one's outputs equal the backbone's)."""
    engram_init(InitOptions(out=path, rows_per_head=1000, dtype="float32", progress=False))
    manifest = json.loads((path / "engram.json").read_text())
    dense_path = path / manifest["dense"]["file"]
    dense = load_file(dense_path)
    gen = torch.Generator().manual_seed(0)
    for name, value in dense.items():
        if name.endswith("value_proj.weight"):
            dense[name] = torch.randn(value.shape, generator=gen) * 0.05
    save_file(dense, dense_path)
    manifest["dense"]["sha256"] = file_sha256(dense_path, progress=False)
    (path / "engram.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    ckpt = memory_checkpoint(root / "ckpt")
    shared = Path(f"/dev/shm/engram-test-dp-{os.getpid()}")
    dp = ServerProcess(engram_serve_cmd(["--engram", str(ckpt), "--data-parallel-size", "2", *COMMON]),
                       root / "dp.log", env={DIR_ENV: str(shared)})
    lone = ServerProcess(engram_serve_cmd(["--engram", str(ckpt), "--table-placement", "host", *COMMON]),
                         root / "lone.log")
    for srv in (dp, lone):
        srv.launch()
    try:
        for srv in (dp, lone):
            srv.wait_healthy()
        for rank in (0, 1):  # the port answers once one worker is ready
            _wait_worker_ready(dp, rank)
        yield {"dp": dp, "lone": lone, "ckpt": ckpt, "shared": shared}
    finally:
        for srv in (dp, lone):
            srv.stop()
        shutil.rmtree(shared, ignore_errors=True)


def _worker_pids(dp: ServerProcess) -> dict[int, int]:
    """The newest pid of each worker, from the supervisor's log."""
    return {int(r): int(p) for r, p in re.findall(r"engine worker (\d+) started \(pid (\d+)", dp.log_path.read_text())}


def _wait_worker_ready(dp: ServerProcess, rank: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(_worker_url(dp, rank, "/health"), timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, dp.log_tail()
        time.sleep(0.5)


def _worker_url(dp: ServerProcess, rank: int, path: str) -> str:
    return f"http://{dp.host}:{dp.port + 1 + rank}{path}"


def _complete(url: str) -> httpx.Response:
    """One request on a fresh connection (the kernel balances connections, not requests)."""
    body = {"model": "SmolLM2-135M-Instruct", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return httpx.post(url, json=body, timeout=120)


def _copies(servers) -> list[SharedCopy]:
    tables = json.loads((servers["ckpt"] / "engram.json").read_text())["tables"]
    return [SharedCopy.of(entry, servers["shared"]) for entry in tables.values()]



def test_every_worker_gives_the_lone_host_servers_text_from_one_table_copy(servers):
    dp, lone = servers["dp"], servers["lone"]
    expected = _complete(lone.url("/v1/completions")).json()["choices"][0]["text"]
    for rank in (0, 1):
        r = _complete(_worker_url(dp, rank, "/v1/completions"))
        assert r.headers["x-engram-worker"] == str(rank)
        assert r.json()["choices"][0]["text"] == expected
    pids = _worker_pids(dp).values()
    for copy in _copies(servers):
        usage = [mapping_kb(pid, copy.path) for pid in pids]
        assert all(u["Rss"] >= 0.99 * copy.nbytes / 1024 for u in usage), usage
        assert sum(u["Pss"] for u in usage) == pytest.approx(copy.nbytes / 1024, rel=0.02), usage


def _successes(dp: ServerProcess, rank: int) -> float:
    text = httpx.get(_worker_url(dp, rank, "/metrics"), timeout=30).text
    return sum(float(v) for v in re.findall(r"^engram_serve_request_success_total\{[^}]*\} (\S+)$", text, re.M))


def test_both_workers_serve_the_one_port(servers):
    dp = servers["dp"]
    before = [_successes(dp, rank) for rank in (0, 1)]
    served = Counter()
    for _ in range(12):
        r = _complete(dp.url("/v1/completions"))
        assert r.status_code == 200
        served[int(r.headers["x-engram-worker"])] += 1
    assert set(served) == {0, 1}, served
    assert [_successes(dp, rank) - before[rank] for rank in (0, 1)] == [served[0], served[1]]


def test_a_killed_worker_is_restarted_while_the_port_keeps_serving(servers):
    dp = servers["dp"]
    copies = {c.path: c.path.stat() for c in _copies(servers)}
    victim = _worker_pids(dp)[0]
    os.kill(victim, signal.SIGKILL)
    _wait_dead(victim)  # connections the kernel queued on its socket before it closed are lost with it
    deadline = time.monotonic() + 300
    answered = 0
    while _worker_pids(dp)[0] == victim or not _ready_again(dp):  # while worker 0 restarts and loads
        assert time.monotonic() < deadline, dp.log_tail()
        assert _complete(dp.url("/v1/completions")).status_code == 200
        answered += 1
    assert answered >= 5
    served = {_complete(dp.url("/v1/completions")).headers["x-engram-worker"] for _ in range(12)}
    assert served == {"0", "1"}
    restart_log = dp.log_path.read_text().split(f"pid {_worker_pids(dp)[0]},")[1]
    assert restart_log.count("[worker 0] engram_serve.shared_tables: attached shared table copy") == len(copies)
    assert "[worker 0] engram_serve.shared_tables: wrote" not in restart_log
    for path, stat in copies.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)


def _wait_dead(pid: int) -> None:
    """Until the supervisor has reaped the process. A zombie leader is not enough: its other
    threads may still hold the shared socket open, and connections queued there are reset when
    the last one exits. The supervisor reaps within its 0.5 s poll, once every thread is gone."""
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"pid {pid} not reaped 30 s after SIGKILL"
        time.sleep(0.05)


def _ready_again(dp: ServerProcess) -> bool:
    """The restarted worker 0 answers /health on its own port with 200 (its engine loaded)."""
    try:
        return httpx.get(_worker_url(dp, 0, "/health"), timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_to_the_supervisor_stops_every_worker(servers):
    """Last in this module: the supervisor forwards SIGTERM, each worker drains and exits, and the
    supervisor exits 0 once they have."""
    dp = servers["dp"]
    workers = list(_worker_pids(dp).values())
    dp.signal(signal.SIGTERM)
    assert dp.proc.wait(timeout=60) == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
