"""The Engram module and the MemoryTable seam its rows come through, with its backends:
resident (`InMemoryTable`), host memory (`HostTable`), memory-mapped files (`DiskTable`) and a
hot-row cache in front of any of them (`CachedTable`), quantized int8/fp8 rows (`QuantizedTable`); and
the row index and row edits behind `engram memory` (row_index, editing)."""

from .cache import CachedTable
from .engram import Engram, ShortConv, ShortConvState
from .offload import DiskTable, HostTable, convert_checkpoint_tables
from .quantized import QuantizedTable
from .row_index import RowIndex
from .table import InMemoryTable, MemoryTable

__all__ = ["Engram", "ShortConv", "ShortConvState", "MemoryTable", "InMemoryTable", "HostTable", "DiskTable",
           "CachedTable", "QuantizedTable", "RowIndex", "convert_checkpoint_tables"]
