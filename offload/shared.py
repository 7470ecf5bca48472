"""Placement ``shared``: one copy of each table per host, in shared memory, mapped by every process.

A production Engram model carries ~190 GiB of tables; N engine processes on a host must not
hold N copies. The first process to open a table copies the checkpoint's file into the shared
directory (``/dev/shm/engram-serve`` by default, ``ENGRAM_SERVE_SHARED_TABLE_DIR``), and every
process maps that copy read-only (``MAP_SHARED | MAP_POPULATE``): the pages exist once and are
counted once (each process's Pss is its share).

- **Identity.** A copy is named ``<sha256[:32]>-<nbytes>.safetensors`` from the manifest entry,
  so two checkpoints never collide and a changed checkpoint gets a new copy.
- **Writing.** Under an exclusive ``flock`` on ``<name>.lock`` (concurrent first starts: one
  writes, the others wait and attach), streamed to ``<name>.partial.<pid>`` while hashing it;
  the sha256 must equal the manifest's, then it is renamed into place and a sidecar
  ``<name>.json`` records sha256, size, inode and a probe digest (the header and 64 pages spread
  over the file). The sha is computed once, when the copy is written.
- **Attaching** checks, under the same lock: the size against the manifest, the sidecar against
  the manifest and the file's inode, the safetensors header, and the probe digest (a few hundred
  KiB read, not 8 GB hashed); with ``verify`` (``--verify-tables``) the whole copy's sha256. A
  copy that fails any check is logged naming the file and why, removed, rebuilt, never served.
- **Who removes a copy.** Nobody, automatically: it outlives every process (a crashed or
  restarted worker attaches to it again), until ``engram-serve --drop-shared-tables`` (removes
  the copies no running process holds; each attached process holds a shared ``flock`` on
  ``<name>.users``), an ``rm`` of the directory, or a reboot.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from offload.tablefile import TableFileError, TableHeader, file_sha256, read_header

DIR_ENV = "ENGRAM_SERVE_SHARED_TABLE_DIR"
DEFAULT_DIR = Path("/dev/shm/engram-serve")
SUFFIX = ".safetensors"
_COPY_BLOCK = 8 << 20
_PROBE_PAGES = 64
_PAGE = 4096
log = logging.getLogger("engram_serve.shared_tables")


def shared_dir() -> Path:
    """Where the copies live: $ENGRAM_SERVE_SHARED_TABLE_DIR, else /dev/shm/engram-serve."""
    return Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)


def probe_digest(path: Path, nbytes: int) -> str:
    """sha256 of the file's first page and _PROBE_PAGES pages spread evenly up to its end: catches
    a copy overwritten or zeroed in place without reading all of it."""
    digest = hashlib.sha256()
    starts = np.unique(np.linspace(0, max(0, nbytes - _PAGE), _PROBE_PAGES + 1).astype(np.int64))
    with open(path, "rb", buffering=0) as f:
        for start in starts:
            f.seek(int(start))
            digest.update(f.read(_PAGE))
    return digest.hexdigest()


@dataclass
class SharedCopy:
    """One table's copy: the file, its sidecar and its locks, named from the manifest entry."""

    directory: Path
    sha256: str
    nbytes: int

    @classmethod
    def of(cls, entry: dict, directory: Path | None = None) -> SharedCopy:
        if "sha256" not in entry or "nbytes" not in entry:
            raise TableFileError(f"table {entry.get('file')}: placement shared needs the manifest's sha256 and "
                                 "nbytes (they name the shared copy)")
        return cls(Path(directory or shared_dir()), entry["sha256"], int(entry["nbytes"]))

    @property
    def name(self) -> str:
        return f"{self.sha256[:32]}-{self.nbytes}"

    @property
    def path(self) -> Path:
        return self.directory / (self.name + SUFFIX)

    def _aside(self, suffix: str) -> Path:
        return self.directory / (self.name + suffix)

    def problem(self, verify: bool) -> str | None:
        """Why the copy in place may not be served (None: it may): every check but the full sha
        is cheap."""
        try:
            st = self.path.stat()
            meta = json.loads(self._aside(".json").read_text())
        except FileNotFoundError as exc:
            return f"{Path(exc.filename).name} is missing (half-written or left by a crash)"
        except (OSError, ValueError) as exc:
            return f"unreadable sidecar ({exc})"
        if st.st_size != self.nbytes:
            return f"it is {st.st_size} bytes, the manifest says {self.nbytes} (truncated?)"
        if (meta.get("sha256"), meta.get("nbytes"), meta.get("inode")) != (self.sha256, self.nbytes, st.st_ino):
            return "its sidecar describes another file"
        try:
            read_header(self.path)
        except TableFileError as exc:
            return str(exc)
        if probe_digest(self.path, self.nbytes) != meta.get("probe"):
            return "its contents changed since it was written (probe digest mismatch)"
        if verify and file_sha256(self.path) != self.sha256:
            return "its sha256 does not match the manifest"
        return None

    def _remove(self) -> None:
        for path in (self.path, self._aside(".json")):
            path.unlink(missing_ok=True)

    def _write(self, source: Path) -> None:
        """Copy `source` in, hashing it on the way; rename into place only if the sha matches."""
        free = shutil.disk_usage(self.directory).free
        if free < self.nbytes:
            raise TableFileError(f"shared table copy {self.path}: needs {self.nbytes / 2**30:.2f} GiB, "
                                 f"{self.directory} has {free / 2**30:.2f} GiB free (docker: --shm-size)")
        partial = self._aside(f".partial.{os.getpid()}")
        digest = hashlib.sha256()
        try:
            with open(source, "rb", buffering=0) as src, open(partial, "wb") as dst:
                while block := src.read(_COPY_BLOCK):
                    digest.update(block)
                    dst.write(block)
                os.posix_fadvise(src.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the checkpoint need not stay cached too
            if digest.hexdigest() != self.sha256:
                raise TableFileError(f"table file {source} has sha256 {digest.hexdigest()}, the manifest says "
                                     f"{self.sha256}; not sharing it")
            os.chmod(partial, 0o444)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
        meta = {"sha256": self.sha256, "nbytes": self.nbytes, "inode": self.path.stat().st_ino,
                "probe": probe_digest(self.path, self.nbytes), "source": str(source),
                "writer_pid": os.getpid(), "written_at": time.time()}
        tmp = self._aside(f".json.{os.getpid()}")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, self._aside(".json"))

    def attach(self, source: Path, verify: bool = False) -> int:
        """Make sure a servable copy is in place (writing it if needed) and return an open fd on
        `<name>.users` holding a shared flock: this process uses the copy until it closes it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self._aside(".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another process is checking or writing shared table copy %s; waiting", self.path)
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._remove_leftovers()
            if self.path.exists() or self._aside(".json").exists():
                problem = self.problem(verify)
                if problem is None:
                    log.info("attached shared table copy %s (%d bytes) for %s", self.path, self.nbytes, source)
                    return self._hold()
                log.warning("refusing shared table copy %s: %s; removing and rebuilding it", self.path, problem)
                self._remove()
            t0 = time.perf_counter()
            self._write(source)
            log.info("wrote shared table copy %s (%d bytes, sha256 verified) from %s in %.1f s",
                     self.path, self.nbytes, source, time.perf_counter() - t0)
            return self._hold()

    def _remove_leftovers(self) -> None:
        """A writer killed mid-copy leaves its partial file (RAM, in /dev/shm); under the lock no
        one is writing, so whatever partial files there are belong to dead writers."""
        for path in self.directory.glob(self.name + ".*.*"):
            if path.name.startswith((self.name + ".partial.", self.name + ".json.")):
                log.warning("removing %s, left by a writer that stopped before it finished", path)
                path.unlink(missing_ok=True)

    def _hold(self) -> int:
        fd = os.open(self._aside(".users"), os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd

    def drop(self) -> bool:
        """Remove the copy unless a running process holds it; True if removed."""
        with open(self._aside(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = os.open(self._aside(".users"), os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            finally:
                os.close(fd)
            self._remove()  # the empty lock files stay: a process waiting on them must lock the same inode
            return True


def drop_unused(directory: Path | None = None) -> tuple[list[Path], list[Path]]:
    """`engram-serve --drop-shared-tables`: remove every copy in `directory` that no running
    process holds; returns (removed, kept because in use)."""
    directory = Path(directory or shared_dir())
    removed, in_use = [], []
    for path in sorted(directory.glob("*" + SUFFIX)):
        sha, _, nbytes = path.name[: -len(SUFFIX)].partition("-")
        copy = SharedCopy(directory, sha, int(nbytes))
        (removed if copy.drop() else in_use).append(path)
    return removed, in_use


def map_shared(header: TableHeader) -> torch.Tensor:
    """The copy's raw rows as a read-only host tensor over the shared pages (MAP_POPULATE: mapped
    now, so a step never page-faults). The tensor is never written: a write would fault."""
    with open(header.path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), header.file_nbytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ)
    rows = np.frombuffer(mapped, dtype=header.dtype.numpy_raw, offset=header.data_offset,
                         count=header.num_rows * header.raw_row_elems).reshape(header.num_rows, header.raw_row_elems)
    with warnings.catch_warnings():  # "not writable": the rows are read-only by design
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows).view(header.dtype.torch_raw)
