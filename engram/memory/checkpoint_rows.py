"""Where a model folder keeps each Engram layer's table (`blocks.{i}.engram.table.weight` in
model.safetensors), and its rows read in chunks, never the whole tensor at once. Every table
built from a checkpoint reads through here (`HostTable`, `DiskTable`, `QuantizedTable`
`.from_checkpoint`, and `convert.convert_checkpoint_tables`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch

from ..hashing.layout import HashLayout

CHUNK_BYTES = 64 << 20  # conversion and checksums stream the data in pieces of this size
TABLE_NAME = re.compile(r"blocks\.(\d+)\.engram\.table\.weight")


def checkpoint_table(checkpoint_dir: str | os.PathLike, layer_id: int,
                     table_sizes: Sequence[int] | None) -> tuple[Path, str, list[int]]:
    """(model.safetensors, tensor name, per-head sizes) of Engram layer `layer_id` in a model folder."""
    from safetensors import safe_open

    ckpt = Path(checkpoint_dir)
    st_path, name = ckpt / "model.safetensors", f"blocks.{layer_id}.engram.table.weight"
    if table_sizes is None:
        if not (ckpt / "hash_layout.json").is_file():
            raise FileNotFoundError(f"{ckpt / 'hash_layout.json'} is missing; pass table_sizes= explicitly")
        primes = HashLayout.load(ckpt / "hash_layout.json").primes
        if int(layer_id) not in primes:
            raise ValueError(f"{ckpt / 'hash_layout.json'} has no Engram layer {layer_id} (it has {sorted(primes)})")
        table_sizes = primes[int(layer_id)]
    with safe_open(str(st_path), framework="pt") as f:
        if name not in f.keys():
            found = sorted(k for k in f.keys() if TABLE_NAME.fullmatch(k))
            raise ValueError(f"{st_path} has no tensor {name}; its Engram tables are {found}")
    return st_path, name, [int(s) for s in table_sizes]


def checkpoint_chunks(checkpoint_dir: str | os.PathLike, layer_id: int, table_sizes: Sequence[int] | None,
                      chunk_bytes: int = CHUNK_BYTES) -> tuple[list[int], Iterator[torch.Tensor]]:
    """(per-head sizes, the rows of Engram layer `layer_id` of a model folder in consecutive
    chunks of ~`chunk_bytes`), read lazily from model.safetensors."""
    from safetensors import safe_open

    st_path, name, table_sizes = checkpoint_table(checkpoint_dir, layer_id, table_sizes)

    def chunks() -> Iterator[torch.Tensor]:
        with safe_open(str(st_path), framework="pt") as f:
            piece = f.get_slice(name)
            rows, dim = piece.get_shape()
            step = max(1, chunk_bytes // (dim * piece[0:1].element_size()))  # rows per chunk
            for start in range(0, rows, step):
                yield piece[start:min(start + step, rows)]

    return table_sizes, chunks()


def checkpoint_table_layers(checkpoint_dir: str | os.PathLike) -> list[int]:
    """The Engram layers whose tables a model folder's model.safetensors holds."""
    from safetensors import safe_open

    with safe_open(str(Path(checkpoint_dir) / "model.safetensors"), framework="pt") as f:
        return sorted(int(m.group(1)) for k in f.keys() if (m := TABLE_NAME.fullmatch(k)))
