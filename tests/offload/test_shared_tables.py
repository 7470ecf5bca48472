"""Placement shared, across real processes: one copy per host counted once (Pss from
/proc/PID/smaps), one writer among concurrent first starts, a killed process loses nothing for
the others and a restarted one attaches to the copy in place, a stale copy is refused, logged
and rebuilt, copies in use survive --drop-shared-tables, and on CUDA every process page-locks
the read-only mapping (traced with a stand-in cudart)."""
from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import engram_kernels as kernels
from loadtest.process import repo_env
from offload.device import ComputeDevice
from offload.shared import SharedCopy, drop_unused
from offload.store import TableSet
from offload.tablefile import TableFileError
from loadtest.memory import mapping_kb

LARGE = {1: [4099, 4111, 4127, 4129]}  # 16466 rows x 64 float32: a 4.2 MB table
ROWS = np.arange(0, 16466, 97)

# A process holding a TableSet: prints "ready <checksum>" once open, then one checksum of the
# same rows per line read from stdin.
HOLDER = """
import logging, sys, json, numpy as np
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from offload.store import TableSet
path, placement = sys.argv[1], sys.argv[2]
tables = TableSet.open(path, json.load(open(path + "/engram.json"))["tables"], placement=placement, progress=False)
rows = np.arange(0, 16466, 97)
checksum = lambda: float(tables[1].gather(rows).double().sum())
print("ready", checksum(), flush=True)
for _ in sys.stdin:
    print(checksum(), flush=True)
"""


class Holder:
    def __init__(self, ckpt: Path, log: Path, placement: str = "shared"):
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(ckpt), placement], env=repo_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)

    def ready(self) -> float:
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), f"holder failed: {self.log.read_text()[-2000:]}"
        return float(line.split()[1])

    def checksum(self) -> float:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()



def _wait_for(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert time.time() < deadline, f"{text!r} never logged: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def _expected(ckpt) -> float:
    return float(ckpt.values[1][ROWS].double().sum())


def test_processes_map_one_copy_counted_once(ckpt_factory, tmp_path):
    """Three processes: the copy's pages are in every one (Rss = the table) and counted once
    among them (sum of Pss = the table), and every one gathers the stored rows."""
    ckpt = ckpt_factory(head_sizes=LARGE)
    copy = SharedCopy.of(ckpt.tables["1"])
    holders = [Holder(ckpt.path, tmp_path / f"h{i}.log") for i in range(3)]
    try:
        assert all(h.ready() == pytest.approx(_expected(ckpt)) for h in holders)
        table_kb = copy.nbytes / 1024
        usage = [mapping_kb(h.proc.pid, copy.path) for h in holders]
        assert all(u["Rss"] >= 0.99 * table_kb for u in usage), usage
        assert sum(u["Pss"] for u in usage) == pytest.approx(table_kb, rel=0.02), usage
    finally:
        for h in holders:
            h.close()


def test_one_writer_among_concurrent_first_starts(ckpt_factory, tmp_path):
    """While the copy's lock is taken (here by the test), two starting processes both wait; once
    it is free exactly one writes the copy and the other attaches to it."""
    ckpt = ckpt_factory(head_sizes=LARGE)
    copy = SharedCopy.of(ckpt.tables["1"])
    copy.directory.mkdir(parents=True, exist_ok=True)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    with open(copy.directory / (copy.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        holders = [Holder(ckpt.path, log) for log in logs]
        for log in logs:
            _wait_for(log, "waiting")
    try:
        assert all(h.ready() == pytest.approx(_expected(ckpt)) for h in holders)
        text = [log.read_text() for log in logs]
        assert sum("wrote shared table copy" in t for t in text) == 1, text
        assert sum("attached shared table copy" in t for t in text) == 1, text
    finally:
        for h in holders:
            h.close()


def test_killed_process_loses_nothing_and_a_restart_attaches(ckpt_factory, tmp_path):
    """kill -9 of one process while another serves: the other keeps gathering the right rows; a
    process started afterwards attaches to the same file (same inode and mtime), writing nothing."""
    ckpt = ckpt_factory(head_sizes=LARGE)
    copy = SharedCopy.of(ckpt.tables["1"])
    first, second = Holder(ckpt.path, tmp_path / "first.log"), Holder(ckpt.path, tmp_path / "second.log")
    try:
        first.ready(), second.ready()
        before = copy.path.stat()
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
        assert second.checksum() == pytest.approx(_expected(ckpt))
        restarted = Holder(ckpt.path, tmp_path / "restarted.log")
        assert restarted.ready() == pytest.approx(_expected(ckpt))
        restarted.close()
        after = copy.path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert "attached shared table copy" in (tmp_path / "restarted.log").read_text()
        assert "wrote" not in (tmp_path / "restarted.log").read_text()
    finally:
        first.close(), second.close()


def _truncate(copy: SharedCopy) -> None:
    os.truncate(copy.path, copy.nbytes - 4096)


def _zero_a_page(copy: SharedCopy) -> None:
    with open(copy.path, "r+b") as f:  # the probe reads the last page
        f.seek(copy.nbytes - 4096)
        f.write(bytes(4096))


def _drop_sidecar(copy: SharedCopy) -> None:
    (copy.directory / (copy.name + ".json")).unlink()


def _stale_sidecar(copy: SharedCopy) -> None:  # a copy replaced behind the sidecar's back
    data = copy.path.read_bytes()
    copy.path.unlink()
    copy.path.write_bytes(data)


@pytest.mark.parametrize("damage, reason", [(_truncate, "truncated"), (_zero_a_page, "probe digest"),
                                            (_drop_sidecar, "missing"), (_stale_sidecar, "another file")])
def test_a_damaged_copy_is_refused_logged_and_rebuilt(ckpt_factory, caplog, damage, reason):
    ckpt = ckpt_factory(head_sizes=LARGE)
    copy = SharedCopy.of(ckpt.tables["1"])
    TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False).close()
    os.chmod(copy.path, 0o644)
    damage(copy)
    caplog.set_level("INFO", logger="engram_serve.shared_tables")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False)
    refusal = [r.getMessage() for r in caplog.records if "refusing" in r.getMessage()]
    assert len(refusal) == 1 and str(copy.path) in refusal[0] and reason in refusal[0], refusal
    assert any("wrote shared table copy" in r.getMessage() for r in caplog.records)
    assert torch.equal(tables[1].gather(ROWS), ckpt.values[1][ROWS])
    assert copy.problem(verify=True) is None
    tables.close()


def test_a_killed_writers_partial_file_is_removed(ckpt_factory, caplog):
    ckpt = ckpt_factory()
    copy = SharedCopy.of(ckpt.tables["1"])
    copy.directory.mkdir(parents=True, exist_ok=True)
    leftover = copy.directory / f"{copy.name}.partial.999999"
    leftover.write_bytes(bytes(1000))
    caplog.set_level("INFO", logger="engram_serve.shared_tables")
    TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False).close()
    assert not leftover.exists()
    assert any(str(leftover) in r.getMessage() for r in caplog.records)


def test_damage_the_probe_misses_is_caught_by_verify(ckpt_factory, caplog):
    """A byte changed between the probed pages passes the cheap checks; --verify-tables hashes the
    whole copy and rebuilds it."""
    ckpt = ckpt_factory(head_sizes=LARGE)
    copy = SharedCopy.of(ckpt.tables["1"])
    TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False).close()
    os.chmod(copy.path, 0o644)
    with open(copy.path, "r+b") as f:
        f.seek(4096 + 2048)  # inside the second page; the probe reads pages at multiples of ~nbytes/64
        f.write(b"\xff")
    assert copy.problem(verify=False) is None
    caplog.set_level("INFO", logger="engram_serve.shared_tables")
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="shared", verify_hash=True, progress=False)
    assert any("sha256 does not match" in r.getMessage() and str(copy.path) in r.getMessage()
               for r in caplog.records)
    assert torch.equal(tables[1].gather(ROWS), ckpt.values[1][ROWS])
    tables.close()


def test_shared_tables_take_the_host_tables_paths(ckpt_factory):
    """The native CPU gather (and the native prefetch worker, which reads `resident`'s data
    pointer) and the UVA view serve a shared table as a host one."""
    ckpt = ckpt_factory()
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False)
    table = tables[1]
    assert table.native == kernels.available() and table.device_rows() is table.resident
    path = str(SharedCopy.of(ckpt.tables["1"]).path)
    spans = [[int(x, 16) for x in line.split()[0].split("-")]
             for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(path)]
    assert any(a <= table.resident.data_ptr() < b for a, b in spans)  # the rows read are the shared pages
    tables.close()


def test_a_corrupt_checkpoint_table_is_not_shared(ckpt_factory):
    ckpt = ckpt_factory()
    path = ckpt.path / ckpt.tables["1"]["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TableFileError, match="sha256.*not sharing it"):
        TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False)
    assert not SharedCopy.of(ckpt.tables["1"]).path.exists()


def test_drop_removes_only_copies_no_process_holds(ckpt_factory, shared_dir):
    ckpt = ckpt_factory()
    held = TableSet.open(ckpt.path, ckpt.tables, placement="shared", progress=False)
    other = ckpt_factory(seed=1)
    TableSet.open(other.path, other.tables, placement="shared", progress=False).close()
    removed, in_use = drop_unused(shared_dir)
    assert {p.name for p in in_use} == {SharedCopy.of(e).path.name for e in ckpt.tables.values()}
    assert {p.name for p in removed} == {SharedCopy.of(e).path.name for e in other.tables.values()}
    assert all(not p.exists() for p in removed) and all(p.exists() for p in in_use)
    held.close()
    assert len(drop_unused(shared_dir)[0]) == len(ckpt.tables)


def test_on_cuda_each_process_page_locks_the_mapping_read_only(ckpt_factory, monkeypatch):
    """Traced: a stand-in cudart records cudaHostRegister of the mapped rows (no copy), with the
    read-only flag a PROT_READ mapping needs, and the unregister when the table is freed."""
    calls = []

    class Cudart:
        def cudaHostRegister(self, ptr, nbytes, flags):
            calls.append(("register", ptr, nbytes, flags))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart())
    ckpt = ckpt_factory()
    device = ComputeDevice("cpu")
    device.pinned = True  # as on CUDA: tables in host memory are page-locked
    tables = TableSet.open(ckpt.path, ckpt.tables, placement="shared", device=device, progress=False)
    rows = {lid: tables[lid].resident for lid in tables.layer_ids}
    registered = [c for c in calls if c[0] == "register"]
    assert [(c[1], c[2]) for c in registered] == [(t.data_ptr(), t.numel() * t.element_size()) for t in rows.values()]
    assert all(c[3] & 0x08 for c in registered)  # cudaHostRegisterReadOnly
    assert all(s["table_bytes"].keys() == {"shared_pinned"} for s in tables.stats.snapshot().values())
    del tables, rows
    gc.collect()
    assert sorted(c[1] for c in calls if c[0] == "unregister") == sorted(c[1] for c in registered)
