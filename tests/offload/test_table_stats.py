"""TableStats: exact utilisation bitmap, thread-safe counters, histograms (the native worker's
counters: tests/runtime/test_prefetch.py)."""
import threading

import numpy as np
import pytest

from offload.stats import BUCKETS, Gather, TableStats


def test_bitmap_counts_each_row_once():
    stats = TableStats()
    stats.add_layer(3, num_rows=1000, row_bytes=128, table_bytes={"host": 1})
    rng = np.random.default_rng(0)
    touched = set()
    for _ in range(50):
        rows = rng.integers(0, 1000, 40)
        touched.update(rows.tolist())
        stats.record_gather(Gather(3, lookups=40, cache_hits=0, rows=rows, rows_gathered=40, seconds=0.001))
    snap = stats.snapshot()[3]
    assert snap["rows_touched"] == len(touched)
    assert snap["rows_touched_ratio"] == len(touched) / 1000
    # 0.001 s is a bound of its own bucket (le is inclusive): 50 there and in every bucket above
    assert dict(snap["gather_seconds_buckets"]) == {le: 50 if le >= 0.001 else 0 for le in [*BUCKETS, float("inf")]}
    assert snap["gathers"] == 50 and snap["gather_seconds_total"] == pytest.approx(0.05)


def test_concurrent_updates_add_up():
    stats = TableStats()
    stats.add_layer(1, num_rows=64, row_bytes=128, table_bytes={})

    def work(seed):
        for i in range(500):
            stats.record_gather(Gather(1, 2, 1, np.array([(seed * 8 + i) % 64]), 1, 1e-4))
            stats.record_wait(1, 2e-4)
            stats.snapshot()

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    snap = stats.snapshot()[1]
    assert (snap["lookups"], snap["cache_hits"], snap["bytes_gathered"], snap["waits"]) == (4000, 2000, 256000, 2000)
    assert snap["rows_touched"] == 64 and snap["gathers"] == 2000
    assert snap["wait_seconds_total"] == pytest.approx(0.4)
