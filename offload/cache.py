"""Hot-row cache in front of a table's slower tier (DRAM in front of mmap; device memory in front of host).

Policy: set-associative (8 ways, hashed sets) with LRU replacement inside each set; sized in rows
or bytes. Chosen by measurement (``bench/offload.py``; the hit rates are in docs/performance.md,
"Offload"): on hashed real text it beats frequency admission and direct mapping at every size.

Real N-gram traffic is Zipfian AND bursty (a document repeats its own names and phrases), so
recency beats global frequency there, even beating a static oracle of the stream's top rows at
small sizes; frequency admission only wins on i.i.d. Zipf at large sizes. 8 ways lose under 1 %
to full associativity and make every operation a few vectorised numpy ops over the step's unique
rows (no Python loop per row). ``policy="frequency"`` (admit a missed row only if its aged count,
kept in a small counter sketch, beats the least frequent resident of its set) stays available.

Hit accounting is exact: a lookup is a hit when its row was resident before the step began.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offload.device import put_rows, take_rows

_EMPTY = -1
POLICIES = ("lru", "frequency")
_SET_MULT = np.uint64(0x9E3779B97F4A7C15)
_SKETCH_MULT = np.uint64(0xC2B2AE3D27D4EB4F)


@dataclass(frozen=True)
class CacheConfig:
    """Size in rows (or bytes, converted with the table's row size) and associativity."""

    rows: int = 0
    bytes: int = 0
    ways: int = 8
    policy: str = "lru"   # "lru" | "frequency" (the module docstring says why LRU)

    def capacity_rows(self, row_bytes: int) -> int:
        return max(self.rows, self.bytes // row_bytes if self.bytes else 0)


def _hash(rows: np.ndarray, mult: np.uint64) -> np.ndarray:
    return (rows.astype(np.uint64) * mult) >> np.uint64(32)


class RowCache:
    """Cache of raw table rows; ``data`` lives on `device` in the table's raw dtype."""

    def __init__(self, capacity_rows: int, row_elems: int, raw_dtype: torch.dtype,
                 device: torch.device | str = "cpu", ways: int = 8, policy: str = "lru"):
        if capacity_rows <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity_rows} rows")
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.ways = min(ways, capacity_rows)
        self.num_sets = capacity_rows // self.ways
        self.capacity = self.num_sets * self.ways
        self.tags = np.full((self.num_sets, self.ways), _EMPTY, dtype=np.int64)
        self.last_used = np.full((self.num_sets, self.ways), -1, dtype=np.int64)  # step of last hit/admission
        self._step = 0
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
        self._step += 1
        if self.policy == "frequency":
            np.add.at(self._sketch, self._sketch_idx(unique_rows), counts.astype(np.uint32))
            self._accesses += int(counts.sum())
            if self._accesses >= self._reset_every:
                self._sketch >>= 1
                self._accesses = 0
        sets = self._set_of(unique_rows)
        match = self.tags[sets] == unique_rows[:, None]
        hit = match.any(axis=1)
        ways = match.argmax(axis=1)
        self.last_used[sets[hit], ways[hit]] = self._step
        slots = np.where(hit, sets * self.ways + ways, -1)
        return hit, slots

    def admit(self, rows: np.ndarray, raw: torch.Tensor) -> None:
        """Offer missed unique rows (with their raw data, on the cache's device) for admission."""
        if len(rows) == 0:
            return
        lru = self.policy == "lru"
        freq = np.zeros(len(rows), np.int64) if lru else self._frequency(rows)
        order = np.lexsort((-freq, self._set_of(rows)))          # by set, most frequent first
        rows, freq, sets = rows[order], freq[order], self._set_of(rows[order])
        first_of_set = np.r_[0, np.flatnonzero(np.diff(sets)) + 1]
        rank = np.arange(len(rows)) - np.repeat(first_of_set, np.diff(np.r_[first_of_set, len(rows)]))
        for r in range(min(self.ways, int(rank.max()) + 1)):     # at most `ways` admissions per set
            cand = np.flatnonzero(rank == r)
            cand_sets = sets[cand]
            score = self.last_used[cand_sets] if lru else self._frequency(self.tags[cand_sets])
            victim_way = score.argmin(axis=1)  # empty ways score -1: filled first
            if not lru:  # admit only a row seen more often than the one it would evict
                admit = freq[cand] > score[np.arange(len(cand)), victim_way]
                cand, cand_sets, victim_way = cand[admit], cand_sets[admit], victim_way[admit]
            self.tags[cand_sets, victim_way] = rows[cand]
            self.last_used[cand_sets, victim_way] = self._step
            put_rows(self.data, cand_sets * self.ways + victim_way, take_rows(raw, order[cand]))
