"""Quantized tables: int8 codes with absmax scales, or fp8 (e4m3) codes with absmax scales, per
row or per group of 32 values, as serving stacks store embedding tables to fit them in host
memory. A gather reads the packed rows asked for and dequantizes only those.

    q = QuantizedTable.quantize(table.weight, table.table_sizes, "int8")            # per-row scales
    q = QuantizedTable.quantize(table.weight, table.table_sizes, "fp8", group=32)   # per-32 scales
    QuantizedTable.write(stem, table.weight, sizes, "fp8", group=32); QuantizedTable.open(stem)

Scheme, per group g of a row (g = the row for per-row scales): s = max|w_g| / Q with Q = 127
(int8) or 448 (the largest finite e4m3 value); code = round(w / s) clamped to [-127, 127] for
int8, or (w / s) cast to float8_e4m3fn (round to nearest even); w ~ code * s. An all-zero group
gets s = 1 (codes 0). Scales are float32. Error bound: int8 |w - w~| <= s / 2 per value; e4m3
keeps 3 mantissa bits, a relative error <= 2^-4 for normal values.

Each row is stored packed: its E code bytes, then its E / group float32 scales (4 bytes each,
little endian), so one gather reads both (two gathers, codes and scales apart, cost 1.6x more
here). On disk that is one checksummed DiskTable file of dtype uint8 and width E + 4 E / group,
whose header names the scheme (`quantization`: kind, group, dim); it is memory-mapped and each
block is crc-checked on first touch, like any disk table. Inference only (no gradients).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .checkpoint_rows import checkpoint_chunks
from .disk_format import DiskTable, table_paths
from .host import gather_rows
from .table import MemoryTable

CODES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}


def quantize_rows(weight: torch.Tensor, kind: str, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [R, E], scales [R, E / group] float32) of rows [R, E]; `group` None = one scale per row."""
    if kind not in CODES:
        raise ValueError(f"quantized dtype must be one of {sorted(CODES)}, got {kind!r}")
    R, E = weight.shape
    G = E if group is None else int(group)
    if G < 1 or E % G:
        raise ValueError(f"group {group} must divide the embedding dim {E} (or be None for one scale per row)")
    code_dtype, qmax = CODES[kind]
    w = weight.detach().float().reshape(R, E // G, G)
    scales = w.abs().amax(-1) / qmax
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    x = w / scales.unsqueeze(-1)
    codes = x.round().clamp(-qmax, qmax).to(code_dtype) if kind == "int8" else x.to(code_dtype)
    return codes.reshape(R, E), scales


def _e4m3_over_256(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes -> float16 values / 256, exactly, with integer ops. CPUs have no fp8
    conversion instruction (torch converts one value at a time, ~3.5x slower): an e4m3 code's
    exponent and mantissa bits, moved 7 bits up into a float16, are the same number times 2^-8,
    subnormals included (e4m3's bias is 7, float16's 15). NaN codes are never written."""
    b = codes.view(torch.int8).to(torch.int16)  # sign-extended
    return (((b & 0x7F) << 7) | ((b & 0x80) << 8)).view(torch.float16)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., E] and scales [..., E / group] -> values [..., E] of `dtype` (code * scale,
    exactly as float32 computes it)."""
    groups = scales.shape[-1]
    if codes.dtype == torch.float8_e4m3fn and codes.device.type == "cpu":
        x, scales = _e4m3_over_256(codes).float(), scales.float() * 256.0  # powers of two: exact
    else:
        x = codes.float()
    x = x.unflatten(-1, (groups, codes.shape[-1] // groups)).mul_(scales.float().unsqueeze(-1))
    return x.flatten(-2).to(dtype)


def pack(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [R, E] (1 byte each) and float32 scales [R, G] -> packed rows [R, E + 4G] uint8."""
    R = codes.shape[0]
    return torch.cat([codes.view(torch.uint8), scales.float().contiguous().view(torch.uint8).reshape(R, -1)], 1)


def unpack(rows: torch.Tensor, dim: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows [..., E + 4G] uint8 -> (codes [..., E], float32 scales [..., G])."""
    codes = rows[..., :dim].view(CODES[kind][0])
    scales = rows[..., dim:].contiguous().view(torch.float32)
    return codes, scales


def quantize_packed(weight: torch.Tensor, kind: str, group: int | None = None) -> torch.Tensor:
    return pack(*quantize_rows(weight, kind, group))


class QuantizedTable(MemoryTable):
    """Packed rows (codes + scales) of every row, a CPU/device tensor or a `DiskTable`; the rows
    a gather asks for are dequantized to `out_dtype` on the device of `offsets`."""

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, packed: torch.Tensor | DiskTable,
                 kind: str, group: int | None, *, out_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(table_sizes, embedding_dim, device=device)
        if kind not in CODES:
            raise ValueError(f"quantized kind must be one of {sorted(CODES)}, got {kind!r}")
        if group is not None and (int(group) < 1 or embedding_dim % int(group)):
            raise ValueError(f"group {group} must divide the embedding dim {embedding_dim} "
                             "(or be None: one scale a row)")
        width = embedding_dim + 4 * (embedding_dim // (group or embedding_dim))
        shape = (packed.num_rows, packed.embedding_dim) if isinstance(packed, DiskTable) else tuple(packed.shape)
        if shape != (self.num_rows, width):
            raise ValueError(f"packed rows must be [{self.num_rows}, {width}] (sum of table_sizes, {embedding_dim} "
                             f"codes + scales), got {list(shape)}")
        self.packed, self.kind, self.group, self.out_dtype = packed, kind, group, out_dtype
        self.asynchronous = isinstance(packed, DiskTable)  # rows from a file: prefetch in the background

    @classmethod
    def quantize(cls, weight: torch.Tensor, table_sizes: Sequence[int], kind: str, group: int | None = None,
                 **kwargs) -> "QuantizedTable":
        return cls(table_sizes, weight.shape[1], quantize_packed(weight, kind, group), kind, group,
                   device=weight.device, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed rows (codes and scales)."""
        return self.packed.rows_NE.nbytes if isinstance(self.packed, DiskTable) else self.packed.nbytes

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.packed, DiskTable):
            self.packed.follow(self.offsets.device)  # it delivers to our device
            rows = self.packed.gather(flat_ids)
        elif self.packed.device.type == "cpu":  # into pinned memory when the rows go to an accelerator
            rows = gather_rows(self.packed, flat_ids, flat_ids.device)
        else:  # index_select on flat ids: advanced indexing (packed[ids]) is ~10x slower for small rows
            rows = torch.index_select(self.packed, 0, flat_ids.reshape(-1).to(self.packed.device))
            rows = rows.view(*flat_ids.shape, self.packed.shape[1]).to(flat_ids.device)
        return dequantize(*unpack(rows, self.embedding_dim, self.kind), self.out_dtype)

    def _apply(self, fn, recurse=True):  # resident rows follow .to(device), never a dtype; disk ones stay mapped
        super()._apply(fn, recurse)
        if isinstance(self.packed, torch.Tensor):
            moved = fn(self.packed)
            self.packed = moved if moved.dtype == torch.uint8 else self.packed.to(moved.device)
        return self

    # ------------------------------------------------------------------ disk
    @staticmethod
    def write(path_stem: str | os.PathLike, weight: torch.Tensor | Iterable[torch.Tensor],
              table_sizes: Sequence[int], kind: str, group: int | None = None) -> Path:
        """Quantize rows [R, E] (or consecutive chunks of rows, so a big table is never whole in
        memory) and write them packed as one checksummed disk table."""
        chunks = iter([weight] if isinstance(weight, torch.Tensor) else weight)
        first = next(chunks, None)
        if first is None:
            raise ValueError("no rows to write")
        json_path, _ = table_paths(path_stem)
        stem = json_path.with_suffix("")
        DiskTable.write(stem, (quantize_packed(c, kind, group) for c in itertools.chain([first], chunks)), table_sizes,
                        extra={"quantization": {"kind": kind, "group": group, "dim": int(first.shape[1])}})
        return stem

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, layer_id: int, out_stem: str | os.PathLike,
                        kind: str, group: int | None = None, **open_kwargs) -> "QuantizedTable":
        """Quantize Engram layer `layer_id` of a model folder chunk by chunk into `out_stem`; open it."""
        sizes, chunks = checkpoint_chunks(checkpoint_dir, layer_id, None)
        return cls.open(cls.write(out_stem, chunks, sizes, kind, group), **open_kwargs)

    @classmethod
    def open(cls, path_stem: str | os.PathLike, *, device: torch.device | str | None = None,
             release_every: int | None = None, out_dtype: torch.dtype = torch.float32) -> "QuantizedTable":
        json_path, _ = table_paths(path_stem)
        stem = json_path.with_suffix("")
        q = quantization_of(stem)
        if q is None:
            raise ValueError(f"{json_path} is not a quantized table (its header has no quantization); open it with "
                             "DiskTable.open")
        if q.get("kind") not in CODES or "dim" not in q:
            raise ValueError(f"{json_path}: unknown quantization {q}; rewrite it with engram offload --dtype int8|fp8")
        packed = DiskTable.open(stem, release_every=release_every, packed=True)
        return cls(packed.table_sizes, int(q["dim"]), packed, q["kind"], q["group"], device=device,
                   out_dtype=out_dtype)

    def extra_repr(self) -> str:
        where = "disk" if isinstance(self.packed, DiskTable) else str(self.packed.device)
        return (f"heads={len(self.table_sizes)}, rows={self.num_rows}, dim={self.embedding_dim}, kind={self.kind}, "
                f"group={self.group or 'row'}, {where}")


def quantization_of(path_stem: str | os.PathLike) -> dict | None:
    """The quantization a disk table's header names (None for a plain float table)."""
    json_path, _ = table_paths(path_stem)
    try:
        return json.loads(json_path.read_text()).get("quantization")
    except (OSError, ValueError):
        return None

