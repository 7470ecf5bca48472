"""offload: where Engram tables live (device | host | shared | mmap) and how their rows reach the compute.

Storage only: it is handed global row ids and returns rows. It never sees a token, a hidden
state or a weight (engram_runtime hashes tokens into row ids and computes with the rows).
"""
from offload.cache import CacheConfig, RowCache
from offload.device import ComputeDevice, DeviceError, PinningUnavailableWarning
from offload.dtypes import table_dtype
from offload.stats import TableStats
from offload.store import PLACEMENTS, EngramTable, TableSet
from offload.tablefile import TableFileError, check_table, read_header, write_table

__all__ = [
    "CacheConfig", "RowCache", "ComputeDevice", "DeviceError", "PinningUnavailableWarning", "table_dtype",
    "TableStats", "PLACEMENTS", "EngramTable", "TableSet",
    "TableFileError", "check_table", "read_header", "write_table",
]
