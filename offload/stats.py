"""Per-layer table statistics for the server's /metrics: counters, timings and exact utilisation.

Counters are cumulative since start (Prometheus counters); timings are fed to observers as they
happen (so the server can put them into histograms) and kept as a bounded window of recent
observations for ``snapshot()`` percentiles. Utilisation is exact: one bit per table row, set
when the row is first gathered. Writers are the prefetch worker and the engine thread, readers
the metrics endpoint, so every update and the snapshot hold one lock; observers run outside it.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np

Observer = Callable[[str, int, float], None]
_WINDOW = 4096
_TOUCH_BATCH = 256
_LATER_BATCH = 256  # record_later()'s entries recorded at once, if no reader came first


@dataclass
class LayerStats:
    """Cumulative statistics of one layer's table."""

    num_rows: int
    table_bytes: dict[str, int] = field(default_factory=dict)  # placement -> bytes ("cache" included)
    lookups: int = 0
    cache_hits: int = 0
    rows_gathered: int = 0      # rows read from the table's own tier (see EngramTable.gather)
    bytes_gathered: int = 0
    gathers: int = 0
    gather_seconds_total: float = 0.0
    waits: int = 0
    wait_seconds_total: float = 0.0
    rows_touched: int = 0
    touched_bits: np.ndarray = field(init=False, repr=False)
    recent_gather: deque = field(default_factory=lambda: deque(maxlen=_WINDOW), repr=False)
    recent_wait: deque = field(default_factory=lambda: deque(maxlen=_WINDOW), repr=False)
    untouched: list = field(default_factory=list, repr=False)  # gathered row arrays not yet in touched_bits

    def __post_init__(self) -> None:
        self.touched_bits = np.zeros((self.num_rows + 7) // 8, dtype=np.uint8)

    def touch_pending(self) -> None:
        if self.untouched:
            self.touch(np.unique(np.concatenate(self.untouched)))
            self.untouched.clear()

    def touch(self, unique_rows: np.ndarray) -> None:
        """Mark rows as used; `unique_rows` must be sorted and unique (np.unique's output), so
        each new bit is counted once and rows sharing a byte are OR-ed together first."""
        if len(unique_rows) == 0:
            return
        byte_idx = unique_rows >> 3
        masks = np.left_shift(np.uint8(1), (unique_rows & 7).astype(np.uint8))
        self.rows_touched += int(np.count_nonzero((self.touched_bits[byte_idx] & masks) == 0))
        starts = np.flatnonzero(np.concatenate(([True], byte_idx[1:] != byte_idx[:-1])))
        self.touched_bits[byte_idx[starts]] |= np.bitwise_or.reduceat(masks, starts)


class Gather(NamedTuple):
    """One gather of a layer's rows, for TableStats.record_step (a named tuple: the engine thread
    makes two per batch-1 step, at a third of a frozen dataclass's cost)."""

    layer_id: int
    lookups: int
    cache_hits: int
    rows: np.ndarray
    rows_gathered: int
    bytes_gathered: int
    seconds: float


def _percentile(values: deque, q: float) -> float | None:
    return float(np.percentile(np.fromiter(values, float), q)) if values else None


class TableStats:
    """Statistics of every table in a TableSet; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._layers: dict[int, LayerStats] = {}
        self._observers: list[Observer] = []
        self._later: list[Callable[[], tuple[list[Gather], list[tuple[int, float]]]]] = []

    def add_layer(self, layer_id: int, num_rows: int, table_bytes: dict[str, int]) -> None:
        with self._lock:
            self._layers[layer_id] = LayerStats(num_rows=num_rows, table_bytes=dict(table_bytes))

    def add_observer(self, fn: Observer) -> None:
        """fn(kind, layer_id, seconds) with kind in {"gather", "wait"}, called on every observation."""
        with self._lock:
            self._observers.append(fn)

    def record_wait(self, layer_id: int, seconds: float) -> None:
        self.record_step([], [(layer_id, seconds)])

    def record_step(self, gathers: list[Gather], waits: list[tuple[int, float]]) -> None:
        """Gathers and waits (layer_id, seconds), under one lock. A gather's rows (the row ids it
        touched, any order, repeats allowed) are marked in the utilisation bitmap in batches (at the
        next snapshot, or every _TOUCH_BATCH gathers), which keeps a batch-1 gather's cost to a
        list append instead of a dozen numpy calls."""
        with self._lock:
            for g in gathers:
                s = self._layers[g.layer_id]
                s.lookups += g.lookups
                s.cache_hits += g.cache_hits
                s.rows_gathered += g.rows_gathered
                s.bytes_gathered += g.bytes_gathered
                s.gathers += 1
                s.gather_seconds_total += g.seconds
                s.recent_gather.append(g.seconds)
                s.untouched.append(g.rows)
                if len(s.untouched) >= _TOUCH_BATCH:
                    s.touch_pending()
            for layer_id, seconds in waits:
                s = self._layers[layer_id]
                s.waits += 1
                s.wait_seconds_total += seconds
                s.recent_wait.append(seconds)
            observers = list(self._observers)
        for fn in observers:
            for g in gathers:
                fn("gather", g.layer_id, g.seconds)
            for layer_id, seconds in waits:
                fn("wait", layer_id, seconds)

    def record_later(self, records: Callable[[], tuple[list[Gather], list[tuple[int, float]]]]) -> None:
        """record_step(*records()) for a hot path: kept as is until a reader wants the figures
        (snapshot(), flush()), or until _LATER_BATCH of them are pending. The engine thread
        records a step's native gathers this way: mid-forward, building and recording them cost
        ~0.1 ms of a 14 ms batch-1 step, and the observers (the server's histograms) more."""
        with self._lock:
            self._later.append(records)
            full = len(self._later) >= _LATER_BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        """Record what record_later() kept; observers see it now."""
        with self._lock:
            later, self._later = self._later, []
        if later:
            gathers, waits = [], []
            for records in later:
                g, w = records()
                gathers += g
                waits += w
            self.record_step(gathers, waits)

    def snapshot(self) -> dict:
        """{layer_id: {...counters, rows_touched_ratio, table_bytes, gather/wait p50/p99}} (a copy)."""
        self.flush()
        with self._lock:
            for s in self._layers.values():
                s.touch_pending()
            return {layer_id: {
                "num_rows": s.num_rows,
                "table_bytes": dict(s.table_bytes),
                "lookups": s.lookups,
                "cache_hits": s.cache_hits,
                "cache_hit_rate": s.cache_hits / s.lookups if s.lookups else 0.0,
                "rows_gathered": s.rows_gathered,
                "bytes_gathered": s.bytes_gathered,
                "gathers": s.gathers,
                "gather_seconds_total": s.gather_seconds_total,
                "gather_seconds_p50": _percentile(s.recent_gather, 50),
                "gather_seconds_p99": _percentile(s.recent_gather, 99),
                "waits": s.waits,
                "wait_seconds_total": s.wait_seconds_total,
                "wait_seconds_p50": _percentile(s.recent_wait, 50),
                "wait_seconds_p99": _percentile(s.recent_wait, 99),
                "rows_touched": s.rows_touched,
                "rows_touched_ratio": s.rows_touched / s.num_rows if s.num_rows else 0.0,
            } for layer_id, s in self._layers.items()}
