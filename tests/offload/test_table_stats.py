"""TableStats: exact utilisation bitmap, thread-safe counters, histograms, the native worker's counters."""
import threading

import numpy as np
import pytest
import torch

import engram_kernels as kernels
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


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
def test_native_counters_are_added_in():
    """What the native worker counts (engram_kernels' TableCounters, read at snapshot) adds to what
    was recorded here: counters, bytes at the layer's row size, histograms, the union of touched rows."""
    counters = kernels.native().TableCounters([100, 50], list(BUCKETS))
    stats = TableStats()
    stats.add_layer(1, num_rows=100, row_bytes=128, table_bytes={})
    stats.add_layer(15, num_rows=50, row_bytes=64, table_bytes={})
    stats.add_native([1, 15], counters)
    stats.record_gather(Gather(1, lookups=3, cache_hits=0, rows=np.array([0, 1, 2]), rows_gathered=3, seconds=0.5))
    stats.record_wait(1, 0.5)
    assert stats.snapshot()[1]["rows_touched"] == 3
    native = kernels.native()
    table = torch.zeros(100, 4)
    worker = native.RowPrefetcher([(table, None, None, [-1, 4], torch.float32, None),
                                   (table[:50], None, None, [-1, 4], torch.float32, None)], None, counters)
    ticket = worker.submit([torch.tensor([[2, 3, 99]]), torch.tensor([[49, 49]])])
    ticket.wait(0)
    ticket.wait(1)
    ticket.wait(1)
    worker.close()
    snap = stats.snapshot()
    assert (snap[1]["lookups"], snap[1]["rows_gathered"], snap[1]["bytes_gathered"]) == (6, 6, 6 * 128)
    assert snap[1]["rows_touched"] == 5 and snap[1]["gathers"] == 2 and snap[1]["waits"] == 2
    assert snap[1]["wait_seconds_buckets"][-1][1] == 2 and snap[1]["wait_seconds_total"] >= 0.5
    assert (snap[15]["lookups"], snap[15]["bytes_gathered"], snap[15]["rows_touched"]) == (2, 2 * 64, 1)
    assert snap[15]["gathers"] == 1 and snap[15]["waits"] == 2
