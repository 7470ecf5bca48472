"""No cold-shape stall: the KV cache commits 4 KiB pages as sequences write them, not 2 MiB huge
pages (the first burst of 32 new sequences used to stall for seconds; bench/warm_up.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engram_runtime.model import zeros_on_demand

SMAPS = Path("/proc/self/smaps")


def _mapping(address: int) -> dict[str, int]:
    """The kB fields of this process's mapping that holds `address` (Linux's smaps)."""
    fields: dict[str, int] = {}
    inside = False
    for line in SMAPS.read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.endswith(" kB"):
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields


@pytest.mark.skipif(not SMAPS.exists(), reason="needs Linux's /proc/self/smaps")
def test_a_slots_first_write_commits_a_page_not_a_huge_page():
    cache = zeros_on_demand((4, 3, 2048, 64), torch.float32)  # 6 MiB: numpy would ask for huge pages
    cache[:, :, 0] = 1.0  # each sequence's first token in every head row
    mapping = _mapping(cache.data_ptr())
    assert mapping["AnonHugePages"] == 0
    assert mapping["Rss"] <= 4 * 3 * 4 + 8  # one 4 KiB page per (slot, head) row
    assert cache.sum() == 4 * 3 * 64
