"""Table store: where each Engram table lives (device | host | shared | mmap) and how rows are gathered from it.

- ``device``: the raw table is one tensor on the compute device (the in-process baseline).
- ``host``: the raw table in host DRAM, page-locked on CUDA (see ``offload.device``). Loading
  streams the file straight into the final buffer in chunks with a progress bar: never two copies.
- ``shared``: as ``host`` for the compute path, but the rows are one copy per host in shared
  memory (``offload.shared``), mapped read-only by every engine process and page-locked by each
  on CUDA.
- ``mmap``: the safetensors file mapped read-only at its data offset (``numpy.memmap``, advised
  MADV_RANDOM so a 128-byte row does not pull in readahead), so a table larger than RAM is served
  through the page cache. A DRAM row cache usually sits in front of it.

A gather in front of mmap or a cache deduplicates and sorts the step's rows (``np.unique``: sorted
unique rows make the mmap tier read in file order, and each row is read once however many tokens
share it), serves cache hits from the cache, reads the misses from the tier into a staging buffer
with one ``index_select`` / ``numpy.take`` (no per-row Python), moves them to the compute device,
expands back to the requested order and dequantises there. Raw rows cross the slow link, not
float32. A table wholly in memory without a cache skips the deduplication: its rows are read as
requested, repeats included (``rows_gathered`` counts them); on CPU one native call
(``engram_kernels.gather_rows``) gathers and decodes them.
"""
from __future__ import annotations

import mmap
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import engram_kernels as kernels
from offload.cache import CacheConfig, RowCache
from offload.device import ComputeDevice, DeviceError, as_numpy, put_rows, take_rows
from offload.dtypes import table_dtype
from offload.shared import SharedCopy, map_shared
from offload.stats import Gather, TableStats
from offload.tablefile import TableFileError, TableHeader, check_table, map_rows, read_header

PLACEMENTS = ("device", "host", "shared", "mmap")
HOST_PLACEMENTS = ("host", "shared")  # raw rows in host DRAM, read alike by every backend
_LOAD_CHUNK = 64 << 20
_STAGING_SLOTS = 2
_MMAP_READ_THREADS = 8      # page faults in flight for a cold mmap gather
_MMAP_PARALLEL_MIN_ROWS = 64
_COLD_READ_SECONDS = 30e-6  # between a row from the page cache and one from disk (docs/performance.md)


class EngramTable:
    """One layer's table in one placement; ``gather(global row ids) -> [n, head_dim]`` compute dtype."""

    def __init__(self, layer_id: int, header: TableHeader, placement: str, device: ComputeDevice,
                 compute_dtype: torch.dtype, stats: TableStats, cache: CacheConfig | None = None,
                 progress: bool = True, rows: torch.Tensor | None = None, users_fd: int | None = None):
        """rows: the raw rows already in memory (TableSet.from_tensors), instead of the header's file;
        users_fd: placement shared, the hold on the shared copy (SharedCopy.attach), released by close()."""
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown table placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        if rows is not None and placement in ("mmap", "shared"):
            raise ValueError(f"an in-memory table cannot be mapped from a file (placement {placement})")
        self.layer_id, self.header, self.placement = layer_id, header, placement
        self.device, self.compute_dtype, self.stats = device, compute_dtype, stats
        self.num_rows, self.head_dim, self.dtype = header.num_rows, header.head_dim, header.dtype
        self._lock = threading.Lock()
        self._staging: list[torch.Tensor | None] = [None] * _STAGING_SLOTS
        self._staging_events = [None] * _STAGING_SLOTS
        self._next_slot = 0
        self._fd: int | None = None
        self._view: tuple[torch.Tensor, object] | None = None  # device_rows(), made on first use
        self._users_fd = users_fd
        if placement == "shared":
            self._tier = map_shared(header)
            if device.pinned:
                device.register_host(self._tier, f"shared table {header.path}", read_only=True)
        elif placement == "mmap":
            self._rows_np = map_rows(header)
            self._rows_np._mmap.madvise(mmap.MADV_RANDOM)
            self._fd = os.open(header.path, os.O_RDONLY)
            self._readers = ThreadPoolExecutor(_MMAP_READ_THREADS, thread_name_prefix=f"engram-mmap-{layer_id}")
            self._tier = None
        else:
            self._tier = self._load(progress) if rows is None else rows
        self.cache = self._make_cache(cache)
        # gathered by one native call (and by the native prefetch worker): CPU memory, no cache
        self.native = (self._tier is not None and not device.is_cuda and self.cache is None
                       and compute_dtype in (torch.float32, torch.bfloat16) and kernels.available())
        label = f"{placement}_pinned" if placement in HOST_PLACEMENTS and device.pinned else placement
        table_bytes = {label: header.file_nbytes - header.data_offset}
        if self.cache is not None:
            table_bytes["cache"] = self.cache.nbytes
        stats.add_layer(layer_id, self.num_rows, header.row_bytes, table_bytes)

    def _make_cache(self, cfg: CacheConfig | None) -> RowCache | None:
        rows = cfg.capacity_rows(self.header.row_bytes) if cfg else 0
        if rows <= 0:
            return None
        if self.placement == "device":
            warnings.warn(f"layer {self.layer_id}: a row cache in front of a device table has nothing "
                          "to speed up; ignoring cache size", RuntimeWarning, stacklevel=3)
            return None
        return RowCache(min(rows, self.num_rows), self.header.raw_row_elems, self.dtype.torch_raw,
                        self.device.torch_device, cfg.ways, cfg.policy)

    def _load(self, progress: bool) -> torch.Tensor:
        """Stream the file into its final buffer (host: pinned on CUDA; device: via a bounce buffer)."""
        shape = (self.num_rows, self.header.raw_row_elems)
        on_device = self.placement == "device" and self.device.is_cuda
        dst = self.device.alloc(shape, self.dtype.torch_raw) if on_device else \
            self.device.alloc_host(shape, self.dtype.torch_raw, f"table {self.header.path}")
        rows_per_chunk = max(1, _LOAD_CHUNK // self.header.row_bytes)
        bounce = self.device.alloc_host((rows_per_chunk, shape[1]), self.dtype.torch_raw) if on_device else None
        path = self.header.path
        with open(path, "rb", buffering=0) as f, tqdm(total=self.num_rows * self.header.row_bytes, unit="B",
                                                       unit_scale=True, desc=f"load {path.name}",
                                                       disable=not progress) as bar:
            f.seek(self.header.data_offset)
            for start in range(0, self.num_rows, rows_per_chunk):
                end = min(self.num_rows, start + rows_per_chunk)
                target = bounce[: end - start] if on_device else dst[start:end]
                view = memoryview(target.view(torch.uint8).numpy()).cast("B")
                got = 0
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        raise TableFileError(f"table file {path} ended early while loading row {start}")
                    got += n
                if on_device:
                    dst[start:end].copy_(target)
                bar.update(got)
        return dst

    @property
    def resident(self) -> torch.Tensor | None:
        """The raw rows held in memory (device/host placements); None for mmap."""
        return self._tier

    def device_rows(self) -> torch.Tensor | None:
        """The raw rows as a gather kernel on the compute device reads them: the table itself when
        it lives there, a zero-copy UVA view of the page-locked host table on CUDA; None for mmap,
        whose rows go through staging."""
        if self._tier is None:
            return None
        if self._tier.device == self.device.torch_device:
            return self._tier
        if self._view is None:
            self._view = self.device.host_view(self._tier, f"table {self.header.path}")
        return self._view[0]

    def check_file(self) -> None:
        """mmap tier: fail clearly (TableFileError) if the mapped file vanished, was replaced or
        changed size (touching it would SIGBUS); other placements hold their rows, nothing to check."""
        if self._fd is None:
            return
        st = os.fstat(self._fd)
        if st.st_nlink == 0:
            raise TableFileError(f"table file {self.header.path} was deleted or replaced while mapped "
                                 f"(layer {self.layer_id}, placement mmap)")
        if st.st_size != self.header.file_nbytes:
            raise TableFileError(f"table file {self.header.path} changed size while mapped: "
                                 f"{st.st_size} bytes, expected {self.header.file_nbytes} (truncated?)")

    def _stage(self, n: int) -> tuple[int, torch.Tensor]:
        """A reusable host staging buffer of >= n rows whose previous contents were consumed."""
        slot = self._next_slot
        self._next_slot = (slot + 1) % _STAGING_SLOTS
        if self._staging_events[slot] is not None:
            self._staging_events[slot].host_wait()
        buf = self._staging[slot]
        if buf is None or buf.shape[0] < n:
            rows = 1 << max(8, (n - 1).bit_length())
            buf = self._staging[slot] = self.device.alloc_host((rows, self.header.raw_row_elems),
                                                               self.dtype.torch_raw)
        return slot, buf[:n]

    def _read_tier(self, rows: np.ndarray) -> tuple[int | None, torch.Tensor]:
        """Raw rows (sorted, unique) from the table's own tier, on the compute device."""
        if self.placement == "device" and self.device.is_cuda:
            return None, take_rows(self._tier, rows)
        slot, staging = self._stage(len(rows))
        if self.placement == "mmap":
            self.check_file()
            self._take_mapped(rows, as_numpy(staging).view(self._rows_np.dtype))
        else:
            take_rows(self._tier, rows, out=staging)
        return slot, self.device.to_device(staging)

    def _take_mapped(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows from the mapping. A page fault blocks its thread, so one thread reads a cold file at
        queue depth 1, while chunks on a few threads (numpy's take releases the GIL) keep several
        reads in flight. That pays only for many rows from disk: a gather of more than
        _MMAP_PARALLEL_MIN_ROWS rows reads its first row alone as a probe of where they are, and
        sends the rest to the readers only if it came from disk: for rows in the page cache, or
        a few rows from disk, the readers' hand-offs cost the forward more than they save
        (docs/performance.md)."""
        if len(rows) <= _MMAP_PARALLEL_MIN_ROWS:
            np.take(self._rows_np, rows, axis=0, out=out)
            return
        t0 = time.perf_counter()
        np.take(self._rows_np, rows[:1], axis=0, out=out[:1])
        rows, out = rows[1:], out[1:]
        if time.perf_counter() - t0 < _COLD_READ_SECONDS:  # the page cache had it
            np.take(self._rows_np, rows, axis=0, out=out)
            return
        bounds = np.linspace(0, len(rows), _MMAP_READ_THREADS + 1).astype(np.int64)
        futures = [self._readers.submit(np.take, self._rows_np, rows[a:b], 0, out[a:b])
                   for a, b in zip(bounds[:-1], bounds[1:])]
        for future in futures:
            future.result()

    def gather(self, row_ids: np.ndarray) -> torch.Tensor:
        """GLOBAL row ids (any shape) -> [n, head_dim] in compute dtype on the compute device."""
        rows = np.array(row_ids, dtype=np.int64).reshape(-1)  # our own copy: stats keep it a while
        t0 = time.perf_counter()
        if self.native:
            out, hits, touched, missed = self._gather_native(rows), 0, rows, rows
        else:
            out, hits, touched, missed = self._gather_staged(rows)
        self.stats.record_gather(Gather(self.layer_id, lookups=int(rows.size), cache_hits=hits, rows=touched,
                                        rows_gathered=len(missed), seconds=time.perf_counter() - t0))
        return out

    def row_error(self, error: IndexError) -> IndexError:
        """The native gather's error for a row id outside the table, naming the layer and file."""
        return IndexError(f"layer {self.layer_id}: {error} for table {self.header.path}")

    def _gather_native(self, rows: np.ndarray) -> torch.Tensor:
        """A table in CPU memory without a cache (self.native): one native call gathers and decodes
        the rows as requested, repeats included. A batch-1 step spends more time in each numpy call
        than in the copy, and the staging ring, events and deduplication of the other paths serve
        only a device copy or a slower tier, neither of which is here."""
        try:
            return kernels.gather_rows(self._tier, torch.from_numpy(rows), self.compute_dtype)
        except IndexError as e:
            raise self.row_error(e) from None

    def _gather_staged(self, rows: np.ndarray) -> tuple[torch.Tensor, int, np.ndarray, np.ndarray]:
        """Through a staging buffer and, for mmap or a cache, deduplicated: (rows in compute dtype,
        cache hits, rows touched, rows read from the tier)."""
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"layer {self.layer_id}: row ids must be in [0, {self.num_rows}) for table "
                             f"{self.header.path}, got [{rows.min()}, {rows.max()}]")
        with self._lock:
            if self.cache is None and self.placement != "mmap":
                # DRAM copies a repeated row as fast as np.unique finds it: read the rows as given
                slot, raw = self._read_tier(rows)
                out = self.dtype.decode(raw, self.compute_dtype)
                hits, touched, missed = 0, rows, rows
            else:
                slot, out, hits, touched, missed = self._gather_unique(rows)
            if slot is not None:
                event = self._staging_events[slot] = self.device.event()
                event.record()
        return out, hits, touched, missed

    def _gather_unique(self, rows: np.ndarray) -> tuple[int | None, torch.Tensor, int, np.ndarray, np.ndarray]:
        """Deduplicated gather (mmap reads each row once, in file order; the cache counts hits per
        row): (staging slot, rows in compute dtype, cache hits, unique rows, rows read from the tier)."""
        unique, inverse, counts = np.unique(rows, return_inverse=True, return_counts=True)
        if self.cache is None:
            slot, raw = self._read_tier(unique)
            hits, missed = 0, unique
        else:
            hit, cache_slots = self.cache.lookup(unique, counts)
            missed = unique[~hit]
            slot, miss_raw = self._read_tier(missed)
            raw = torch.empty((len(unique), self.header.raw_row_elems), dtype=self.dtype.torch_raw,
                              device=self.device.torch_device)
            put_rows(raw, np.flatnonzero(~hit), miss_raw)
            put_rows(raw, np.flatnonzero(hit), take_rows(self.cache.data, cache_slots[hit]))
            self.cache.admit(missed, miss_raw)
            hits = int(counts[hit].sum())
        return slot, self.dtype.decode(take_rows(raw, inverse), self.compute_dtype), hits, unique, missed

    def close(self) -> None:
        if self._view is not None:
            self._view[1]()
            self._view = None
        if self._fd is not None:
            self._readers.shutdown()
            os.close(self._fd)
            self._fd = None
        if self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None


def check_room(need: int, free: int, total: int, device: torch.device) -> None:
    """Refuse, before loading, a device placement of tables that do not fit the device's memory."""
    if need > free:
        raise DeviceError(f"the Engram tables need {need / 2**30:.2f} GiB on {device}, but only {free / 2**30:.2f} "
                          f"of its {total / 2**30:.2f} GiB are free; use --table-placement host (pinned host memory, "
                          "read over PCIe) or mmap")


class TableSet:
    """All Engram tables of a checkpoint, one placement, sharing one TableStats."""

    def __init__(self, tables: dict[int, EngramTable], device: ComputeDevice, stats: TableStats):
        self.tables, self.device, self.stats = tables, device, stats

    @classmethod
    def open(cls, ckpt_dir, tables_manifest: dict[str, dict], placement: str = "host", device="cpu",
             compute_dtype: torch.dtype = torch.float32, cache_rows: int = 0, verify_hash: bool = False,
             cache_bytes: int = 0, cache_policy: str = "lru", pin_memory: bool | None = None,
             progress: bool = True) -> "TableSet":
        """Check every table file against its manifest entry (size always, sha256 if asked) and load
        it. Placement shared checks the sha256 of the shared copy instead (offload.shared): it is
        verified when the copy is written, and fully again on attach only if asked."""
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown table placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
        compute_device = device if isinstance(device, ComputeDevice) else ComputeDevice(device, pin_memory)
        if placement == "device" and compute_device.cuda_primitives:
            need = sum(read_header(Path(ckpt_dir) / e["file"]).file_nbytes for e in tables_manifest.values())
            check_room(need, *compute_device.memory(), compute_device.torch_device)
        stats = TableStats()
        cache = CacheConfig(rows=cache_rows, bytes=cache_bytes, policy=cache_policy)
        tables: dict[int, EngramTable] = {}
        for layer_id, entry in sorted(tables_manifest.items(), key=lambda kv: int(kv[0])):
            path = Path(ckpt_dir) / entry["file"]
            check_table(path, entry, verify_hash=verify_hash and placement != "shared")
            users_fd = None
            if placement == "shared":
                copy = SharedCopy.of(entry)
                users_fd = copy.attach(path, verify=verify_hash)
                path = copy.path
            tables[int(layer_id)] = EngramTable(int(layer_id), read_header(path), placement, compute_device,
                                                compute_dtype, stats, cache, progress, users_fd=users_fd)
        return cls(tables, compute_device, stats)

    @classmethod
    def from_tensors(cls, rows: dict[int, torch.Tensor], dtype: str, placement: str = "host",
                     device: ComputeDevice | str = "cpu", compute_dtype: torch.dtype = torch.float32) -> TableSet:
        """Tables whose raw rows [num_rows, raw_row_elems] of table dtype `dtype` are already in
        memory where `placement` says (host: a host tensor, page-locked for a GPU by the caller,
        e.g. ComputeDevice.alloc_host; device: a tensor on the device): for benchmarks of tables
        too large to write to disk first."""
        compute_device = device if isinstance(device, ComputeDevice) else ComputeDevice(device)
        spec, stats = table_dtype(dtype), TableStats()
        tables = {}
        for layer_id, raw in sorted(rows.items()):
            header = TableHeader(Path(f"<memory: layer {layer_id}>"), spec, raw.shape[0], spec.head_dim(raw.shape[1]),
                                 0, raw.numel() * raw.element_size())
            tables[layer_id] = EngramTable(layer_id, header, placement, compute_device, compute_dtype, stats,
                                           progress=False, rows=raw)
        return cls(tables, compute_device, stats)

    @property
    def layer_ids(self) -> list[int]:
        return sorted(self.tables)

    def __getitem__(self, layer_id: int) -> EngramTable:
        return self.tables[layer_id]

    def close(self) -> None:
        for table in self.tables.values():
            table.close()
