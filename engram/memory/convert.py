"""Checkpoint conversion: every Engram table of a model folder into table files, one pair
(.json + .bin) per layer (`engram offload`), with the writer of a disk or a quantized table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .checkpoint_rows import checkpoint_table_layers
from .disk_format import DiskTable


def convert_checkpoint_tables(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                              convert: Callable[..., object] | None = None, **kwargs) -> dict[int, Path]:
    """Convert every `blocks.{i}.engram.table.weight` of a model folder to `out_dir/layer{i}`
    (.json + .bin) with `convert(checkpoint_dir, layer, stem, **kwargs)` (default
    `DiskTable.from_checkpoint`; `QuantizedTable.from_checkpoint` writes quantized tables).
    Returns {layer_id: stem}."""
    convert = convert or DiskTable.from_checkpoint
    out = {}
    for layer in checkpoint_table_layers(checkpoint_dir):
        stem = Path(out_dir) / f"layer{layer}"
        convert(checkpoint_dir, layer, stem, **kwargs)
        out[layer] = stem
    return out
