"""Per-layer table statistics for the server's /metrics: counters, timing histograms and exact utilisation.

Everything is cumulative since start, as Prometheus counters and histograms are. Gathers and waits
reach these statistics two ways:
- recorded here (``record_gather``, ``record_wait``) by the Python prefetch worker, an inline
  gather or the engine thread;
- counted where they happen by the native prefetch worker (engram_kernels' TableCounters, its
  gathers and the engine thread's waits for them), which ``snapshot()`` reads and adds in. A
  decode step then costs the engine thread no Python for its statistics, which handing each
  step's figures over would (docs/performance.md).
Utilisation is exact: one bit per table row, set when the row is first gathered. Writers are the
prefetch worker and the engine thread, readers the metrics endpoint, so every update and the
snapshot hold one lock.
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

import engram_kernels as kernels

if TYPE_CHECKING:
    import torch

# Upper bounds (seconds) of the gather and wait histograms: a gather or a wait is microseconds (row
# already there) to tens of milliseconds (cold mmap pages). A value equal to a bound counts in its
# bucket (Prometheus' `le`); the last bucket holds the rest.
BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
_TOUCH_BATCH = 256


class Gather(NamedTuple):
    """One gather of a layer's rows, for TableStats.record_gather."""

    layer_id: int
    lookups: int
    cache_hits: int
    rows: np.ndarray  # the row ids it touched, any order, repeats allowed
    rows_gathered: int  # read from the table's tier; bytes follow from the layer's row size
    seconds: float


@dataclass
class Timings:
    """A histogram of durations over BUCKETS: the count per bucket (not cumulative) and the sum."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(BUCKETS) + 1, dtype=np.int64))
    seconds: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.seconds += seconds

    def plus(self, counts, seconds: float) -> "Timings":
        return Timings(self.counts + np.asarray(counts, dtype=np.int64), self.seconds + seconds)


@dataclass
class LayerStats:
    """Cumulative statistics of one layer's table, as recorded here (TableStats.snapshot adds the
    native worker's)."""

    num_rows: int
    row_bytes: int
    table_bytes: dict[str, int] = field(default_factory=dict)  # placement -> bytes ("cache" included)
    lookups: int = 0
    cache_hits: int = 0
    rows_gathered: int = 0      # rows read from the table's own tier (see EngramTable.gather)
    gather: Timings = field(default_factory=Timings)
    wait: Timings = field(default_factory=Timings)
    touched_bits: np.ndarray = field(init=False, repr=False)
    untouched: list = field(default_factory=list, repr=False)  # gathered row arrays not yet in touched_bits

    def __post_init__(self) -> None:
        self.touched_bits = np.zeros((self.num_rows + 7) // 8, dtype=np.uint8)

    def touch_pending(self) -> None:
        """Mark the rows gathered since the last call; in batches, which keeps a batch-1 gather's
        cost to a list append instead of a few numpy calls."""
        if self.untouched:
            rows = np.concatenate(self.untouched)
            self.untouched.clear()
            np.bitwise_or.at(self.touched_bits, rows >> 3, np.left_shift(np.uint8(1), (rows & 7).astype(np.uint8)))


class NativeCounters(Protocol):
    """engram_kernels' TableCounters: read() -> per layer (rows gathered, the gathers' seconds,
    their counts per bucket of BUCKETS, the waits' seconds, their counts, the touched-row bitmap)."""

    def read(self) -> list[tuple]:
        ...


class TableStats:
    """Statistics of every table in a TableSet; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, LayerStats] = {}
        self._native: list[tuple[list[int], NativeCounters]] = []
        self._device_bitmaps: list[tuple[int, torch.Tensor]] = []

    def add_layer(self, layer_id: int, num_rows: int, row_bytes: int, table_bytes: dict[str, int]) -> None:
        with self._lock:
            self._layers[layer_id] = LayerStats(num_rows=num_rows, row_bytes=row_bytes, table_bytes=dict(table_bytes))

    def native_counters(self, layer_ids: list[int]) -> NativeCounters:
        """New native counters for a native worker over these layers (in its order), read in by
        every snapshot; every row it gathers was read from the table's tier (CPU memory, no cache)."""
        with self._lock:
            counters = kernels.native().TableCounters([self._layers[lid].num_rows for lid in layer_ids], list(BUCKETS))
            self._native.append((list(layer_ids), counters))
        return counters

    def add_device_bitmap(self, layer_id: int, touched) -> None:
        """A bool tensor [num_rows] on the compute device (a GPU gather marks its rows there, not
        on the host), read in by every snapshot: the one copy to the host is at scrape time."""
        with self._lock:
            self._device_bitmaps.append((layer_id, touched))

    def record_gather(self, g: Gather) -> None:
        with self._lock:
            s = self._layers[g.layer_id]
            s.lookups += g.lookups
            s.cache_hits += g.cache_hits
            s.rows_gathered += g.rows_gathered
            s.gather.add(g.seconds)
            s.untouched.append(g.rows)
            if len(s.untouched) >= _TOUCH_BATCH:
                s.touch_pending()

    def record_wait(self, layer_id: int, seconds: float) -> None:
        with self._lock:
            self._layers[layer_id].wait.add(seconds)

    def snapshot(self) -> dict:
        """{layer_id: {...counters, rows_touched(_ratio), table_bytes, and per kind (gather, wait) the
        count, seconds_total and seconds_buckets: [(upper bound, cumulative count)] over BUCKETS and
        inf, as Prometheus histograms have them}} (a copy)."""
        native: dict[int, list[tuple]] = {}
        for layers, counters in self._native:
            for layer, figures in zip(layers, counters.read()):
                native.setdefault(layer, []).append(figures)
        on_device = {lid: np.packbits(touched.cpu().numpy(), bitorder="little") for lid, touched in self._device_bitmaps}
        with self._lock:
            out = {}
            for layer_id, s in self._layers.items():
                s.touch_pending()
                lookups, rows_gathered, gather, wait = s.lookups, s.rows_gathered, s.gather, s.wait
                touched = s.touched_bits
                for rows, g_seconds, g_counts, w_seconds, w_counts, bits in native.get(layer_id, ()):
                    lookups, rows_gathered = lookups + rows, rows_gathered + rows
                    gather, wait = gather.plus(g_counts, g_seconds), wait.plus(w_counts, w_seconds)
                    touched = touched | bits.numpy()
                if layer_id in on_device:
                    touched = touched | on_device[layer_id]
                rows_touched = int(np.bitwise_count(touched).sum())
                out[layer_id] = {
                    "num_rows": s.num_rows,
                    "table_bytes": dict(s.table_bytes),
                    "lookups": lookups,
                    "cache_hits": s.cache_hits,
                    "cache_hit_rate": s.cache_hits / lookups if lookups else 0.0,
                    "rows_gathered": rows_gathered,
                    "bytes_gathered": rows_gathered * s.row_bytes,
                    **_timings("gather", gather),
                    **_timings("wait", wait),
                    "rows_touched": rows_touched,
                    "rows_touched_ratio": rows_touched / s.num_rows if s.num_rows else 0.0,
                }
            return out


def _timings(kind: str, t: Timings) -> dict:
    return {f"{kind}s": int(t.counts.sum()), f"{kind}_seconds_total": t.seconds,
            f"{kind}_seconds_buckets": list(zip([*BUCKETS, math.inf], np.cumsum(t.counts).tolist()))}
