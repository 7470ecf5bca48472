"""What server processes hold in memory, from Linux's /proc/PID/smaps (shared-table checks).

Rss counts every page a process maps; Pss divides each page by the number of processes that
map it, so the Pss of pages shared by N processes sums to one copy over them: the figure that
tells one table copy per host from one per process.
"""
from __future__ import annotations

from pathlib import Path


def mapping_kb(pid: int, path: Path) -> dict[str, int]:
    """Rss and Pss (kB) of process `pid`'s mappings of the file `path`."""
    out, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and fields[0].rstrip(":") in out:
            out[fields[0].rstrip(":")] += int(fields[1])
    return out


def process_kb(pid: int) -> dict[str, int]:
    """Rss and Pss (kB) of the whole process (smaps_rollup)."""
    out = {"Rss": 0, "Pss": 0}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key = line.split(":")[0]
        if key in out:
            out[key] = int(line.split()[1])
    return out
