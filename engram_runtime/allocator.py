"""keep_freed_memory: glibc malloc settings for an engine's per-step allocations.

Above its mmap threshold glibc serves each allocation with a fresh mapping, whose pages
fault in on first touch, and it hands a heap top above its trim threshold back to the
system. The mmap threshold starts at 128 KiB and rises to the largest such block freed so
far, so whether a decode step's few-MB tensors (batch-16 logits alone are 3 MB) come back
as new pages every step depends on what the process happened to free before: two identical
engines could differ by thousands of page faults per step (docs/performance.md, "Malloc
thresholds"). Fixed thresholds take the chance out.
"""
from __future__ import annotations

import ctypes

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: blocks up to this size are reused from the heap
TRIM_THRESHOLD = 1 << 30  # freed memory kept for the next step rather than returned


def keep_freed_memory() -> None:
    """Let malloc reuse the blocks a step frees (process-wide; the engine calls it). Without
    glibc (no mallopt) there is nothing to do."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
