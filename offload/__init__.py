"""offload: where Engram tables live (device | host | mmap) and how their rows reach the compute.

Knows nothing about tokens: callers hand it row ids (see engram_runtime.hashing) and get rows back.
"""
from offload.cache import CacheConfig, RowCache
from offload.device import ComputeDevice, DeviceError, PinningUnavailableWarning
from offload.dtypes import table_dtype
from offload.prefetch import PrefetchError, Prefetcher, Ticket
from offload.stats import TableStats
from offload.store import PLACEMENTS, EngramTable, TableSet
from offload.tablefile import TableFileError, check_table, read_header, write_table

__all__ = [
    "CacheConfig", "RowCache", "ComputeDevice", "DeviceError", "PinningUnavailableWarning", "table_dtype",
    "PrefetchError", "Prefetcher", "Ticket", "TableStats", "PLACEMENTS", "EngramTable", "TableSet",
    "TableFileError", "check_table", "read_header", "write_table",
]
