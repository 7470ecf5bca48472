"""What a process's mapping of one file costs, from /proc/PID/smaps (the shared-table tests)."""
from __future__ import annotations

from pathlib import Path


def mapping_kb(pid: int, path: Path) -> dict[str, int]:
    """Rss and Pss (kB) of process `pid`'s mappings of `path`: Rss counts every page mapped,
    Pss divides each page by the processes mapping it, so the Pss of a page shared by N
    processes sums to one page over them."""
    out, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and fields[0].rstrip(":") in out:
            out[fields[0].rstrip(":")] += int(fields[1])
    return out
