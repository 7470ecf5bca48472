"""keep_freed_memory: a step's freed MB-size tensors are reused instead of faulted in again."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP_FAULTS = """
import resource, sys, torch
if sys.argv[1] == "kept":
    from engram_runtime.allocator import keep_freed_memory
    keep_freed_memory()
def step():  # a decode step's few-MB tensors, allocated and freed
    for n in (3 << 20, 5 << 20, 1 << 20):
        torch.ones(n // 4)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_freed_step_memory_is_reused_not_faulted_in_again():
    """Repeating a step's allocations faults in (almost) no new pages with keep_freed_memory; in a
    fresh process without it they fault in again every time (4608 against 256 here). Each in its
    own process: the allocator's state is process-wide."""
    faults = {mode: int(subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True,
                                       check=True, cwd=ROOT).stdout)
              for mode in ("plain", "kept")}
    assert faults["kept"] * 4 < faults["plain"], faults
