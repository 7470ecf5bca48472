"""Hot-row cache in front of a table's slower tier (DRAM in front of mmap; device memory in front of host).

Policy: set-associative (8 ways) with TinyLFU-style frequency admission and least-frequent
eviction. N-gram traffic is Zipfian: a few rows take most lookups and a long tail is seen once.
LRU admits every tail row and so keeps flushing hot rows; admitting a missed row only when its
(aged) access count beats the least-frequent resident of its set keeps the head resident, which
is what a static "top-k rows" cache would do, but learns it online. ``bench/offload.py`` measures
the hit rate of this policy against LRU, direct-mapped and the static top-k oracle on a Zipf
stream and on hashed real text (see the README for the numbers).

Every operation is vectorised over a step's unique rows (numpy on tags and counters, one
torch index op on the data), so the cost per step is a handful of array operations, not a
Python loop per row. Frequencies live in a small counter sketch (8 counters per cache slot,
halved every 10x-capacity accesses so that yesterday's hot rows can leave).

Hit accounting is exact: a lookup is a hit when its row was resident before the step began.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offload.device import put_rows, take_rows

_EMPTY = -1
_SET_MULT = np.uint64(0x9E3779B97F4A7C15)
_SKETCH_MULT = np.uint64(0xC2B2AE3D27D4EB4F)


@dataclass(frozen=True)
class CacheConfig:
    """Size in rows (or bytes, converted with the table's row size) and associativity."""

    rows: int = 0
    bytes: int = 0
    ways: int = 8

    def capacity_rows(self, row_bytes: int) -> int:
        return max(self.rows, self.bytes // row_bytes if self.bytes else 0)


def _hash(rows: np.ndarray, mult: np.uint64) -> np.ndarray:
    return (rows.astype(np.uint64) * mult) >> np.uint64(32)


class RowCache:
    """Cache of raw table rows; ``data`` lives on `device` in the table's raw dtype."""

    def __init__(self, capacity_rows: int, row_elems: int, raw_dtype: torch.dtype,
                 device: torch.device | str = "cpu", ways: int = 8):
        if capacity_rows <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity_rows} rows")
        self.ways = min(ways, capacity_rows)
        self.num_sets = capacity_rows // self.ways
        self.capacity = self.num_sets * self.ways
        self.tags = np.full((self.num_sets, self.ways), _EMPTY, dtype=np.int64)
        self.data = torch.empty((self.capacity, row_elems), dtype=raw_dtype, device=device)
        sketch_bits = max(10, int(np.ceil(np.log2(8 * self.capacity))))
        self._sketch_shift = np.uint64(64 - sketch_bits) - np.uint64(32)
        self._sketch = np.zeros(1 << sketch_bits, dtype=np.uint32)
        self._accesses = 0
        self._reset_every = 10 * self.capacity

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _set_of(self, rows: np.ndarray) -> np.ndarray:
        return (_hash(rows, _SET_MULT) % np.uint64(self.num_sets)).astype(np.int64)

    def _sketch_idx(self, rows: np.ndarray) -> np.ndarray:
        return ((_hash(rows, _SKETCH_MULT) & np.uint64(0xFFFFFFFF)) >> self._sketch_shift).astype(np.int64)

    def _frequency(self, rows: np.ndarray) -> np.ndarray:
        freq = self._sketch[self._sketch_idx(np.maximum(rows, 0))].astype(np.int64)
        return np.where(rows == _EMPTY, -1, freq)

    def lookup(self, unique_rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Count the accesses and find resident rows: (hit mask, data slot per row; -1 on a miss)."""
        np.add.at(self._sketch, self._sketch_idx(unique_rows), counts.astype(np.uint32))
        self._accesses += int(counts.sum())
        if self._accesses >= self._reset_every:
            self._sketch >>= 1
            self._accesses = 0
        sets = self._set_of(unique_rows)
        match = self.tags[sets] == unique_rows[:, None]
        hit = match.any(axis=1)
        slots = np.where(hit, sets * self.ways + match.argmax(axis=1), -1)
        return hit, slots

    def admit(self, rows: np.ndarray, raw: torch.Tensor) -> None:
        """Offer missed unique rows (with their raw data, on the cache's device) for admission."""
        if len(rows) == 0:
            return
        freq = self._frequency(rows)
        order = np.lexsort((-freq, self._set_of(rows)))          # by set, most frequent first
        rows, freq, sets = rows[order], freq[order], self._set_of(rows[order])
        first_of_set = np.r_[0, np.flatnonzero(np.diff(sets)) + 1]
        rank = np.arange(len(rows)) - np.repeat(first_of_set, np.diff(np.r_[first_of_set, len(rows)]))
        for r in range(min(self.ways, int(rank.max()) + 1)):     # at most `ways` admissions per set
            cand = np.flatnonzero(rank == r)
            cand_sets = sets[cand]
            resident_freq = self._frequency(self.tags[cand_sets])
            victim_way = resident_freq.argmin(axis=1)
            admit = freq[cand] > resident_freq[np.arange(len(cand)), victim_way]
            cand, cand_sets, victim_way = cand[admit], cand_sets[admit], victim_way[admit]
            self.tags[cand_sets, victim_way] = rows[cand]
            put_rows(self.data, cand_sets * self.ways + victim_way, take_rows(raw, order[cand]))
