"""Checkpoint conversion: every Engram table of a model folder into table files, one pair
(.json + .bin) per layer (`engram offload`), with the writer of a disk or a quantized table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .checkpoint_rows import checkpoint_table_layers
from .disk_format import DiskTable


OFFLOAD_JSON = "offload.json"  # which model the tables came from (written by engram offload)


def convert_checkpoint_tables(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                              convert: Callable[..., object] | None = None, manifest: dict | None = None,
                              **kwargs) -> dict[int, Path]:
    """Convert every `blocks.{i}.engram.table.weight` of a model folder to `out_dir/layer{i}`
    (.json + .bin) with `convert(checkpoint_dir, layer, stem, **kwargs)` (default
    `DiskTable.from_checkpoint`; `QuantizedTable.from_checkpoint` writes quantized tables).
    Written staged and renamed (`durable.staged_dir`): a failure leaves no half-written folder.
    `manifest` (the source's identity and hash layout) is written beside them as offload.json.
    Returns {layer_id: stem}."""
    import json

    from ..durable import staged_dir

    convert = convert or DiskTable.from_checkpoint
    out = {}
    with staged_dir(out_dir) as tmp:
        for layer in checkpoint_table_layers(checkpoint_dir):
            convert(checkpoint_dir, layer, tmp / f"layer{layer}", **kwargs)
            out[layer] = Path(out_dir) / f"layer{layer}"
        if manifest is not None:
            (tmp / OFFLOAD_JSON).write_text(json.dumps(manifest, indent=1))
    return out
