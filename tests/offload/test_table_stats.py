"""TableStats: exact utilisation bitmap, thread-safe counters, observers."""
import threading

import numpy as np

from offload.stats import _LATER_BATCH, Gather, TableStats


def test_bitmap_counts_each_row_once():
    stats = TableStats()
    stats.add_layer(3, num_rows=1000, table_bytes={"host": 1})
    rng = np.random.default_rng(0)
    touched = set()
    for _ in range(50):
        rows = np.unique(rng.integers(0, 1000, 40))
        touched.update(rows.tolist())
        stats.record_step([Gather(3, lookups=40, cache_hits=0, rows=rows, rows_gathered=len(rows),
                                  bytes_gathered=0, seconds=0.001)], [])
    snap = stats.snapshot()[3]
    assert snap["rows_touched"] == len(touched)
    assert snap["rows_touched_ratio"] == len(touched) / 1000
    assert snap["gather_seconds_p50"] == 0.001


def test_concurrent_updates_add_up():
    stats = TableStats()
    stats.add_layer(1, num_rows=64, table_bytes={})
    calls = []
    stats.add_observer(lambda kind, layer, s: calls.append(kind))

    def work(seed):
        for i in range(500):
            stats.record_step([Gather(1, 2, 1, np.array([(seed * 8 + i) % 64]), 1, 128, 1e-4)], [])
            stats.record_wait(1, 2e-4)
            stats.snapshot()

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    snap = stats.snapshot()[1]
    assert (snap["lookups"], snap["cache_hits"], snap["bytes_gathered"], snap["waits"]) == (4000, 2000, 256000, 2000)
    assert snap["rows_touched"] == 64 and len(calls) == 4000


def test_recorded_later_reaches_readers_and_observers():
    """record_later (the native worker's steps) keeps a step until a reader comes, or until
    _LATER_BATCH steps are pending, then records it as record_step would have."""
    stats = TableStats()
    stats.add_layer(1, num_rows=64, table_bytes={})
    seen = []
    stats.add_observer(lambda kind, layer, s: seen.append(kind))

    def step(i):
        return lambda: ([Gather(1, 4, 0, np.array([i % 64]), 4, 512, 1e-4)], [(1, 2e-5)])

    stats.record_later(step(0))
    assert seen == []
    assert stats.snapshot()[1]["lookups"] == 4 and seen == ["gather", "wait"]
    for i in range(_LATER_BATCH):
        stats.record_later(step(i))
    assert len(seen) == 2 + 2 * _LATER_BATCH  # the batch filled up: recorded without a reader
    snap = stats.snapshot()[1]
    assert (snap["lookups"], snap["waits"], snap["rows_touched"]) == (4 * (_LATER_BATCH + 1), _LATER_BATCH + 1, 64)
