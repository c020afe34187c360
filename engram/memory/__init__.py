"""The Engram module and the MemoryTable seam its rows come through, with its backends:
resident (`InMemoryTable`), host memory (`HostTable`), memory-mapped files (`DiskTable`, with
its on-disk format in disk_format) and a hot-row cache in front of any of them (`CachedTable`),
quantized int8/fp8 rows (`QuantizedTable`); checkpoint tables into table files (convert); and
the row index and row edits behind `engram memory` (row_index, editing)."""

from .cache import CachedTable
from .convert import convert_checkpoint_tables
from .disk_format import DiskTable
from .engram import Engram, ShortConv, ShortConvState
from .host import HostTable
from .in_memory import InMemoryTable
from .quantized import QuantizedTable
from .row_index import RowIndex
from .table import MemoryTable

__all__ = ["Engram", "ShortConv", "ShortConvState", "MemoryTable", "InMemoryTable", "HostTable", "DiskTable",
           "CachedTable", "QuantizedTable", "RowIndex", "convert_checkpoint_tables"]
