"""Quantized tables: int8 codes with absmax scales, or fp8 (e4m3) codes with absmax scales, per
row or per group of 32 values, as serving stacks store embedding tables to fit them in host
memory. A gather reads the codes and scales of the rows asked for and dequantizes only those.

    q = QuantizedTable.quantize(table.weight, table.table_sizes, "int8")            # per-row scales
    q = QuantizedTable.quantize(table.weight, table.table_sizes, "fp8", group=32)   # per-32 scales
    QuantizedTable.write(stem, table.weight, sizes, "fp8", group=32); QuantizedTable.open(stem)

Scheme, per group g of a row (g = the row for per-row scales): s = max|w_g| / Q with Q = 127
(int8) or 448 (the largest finite e4m3 value); code = round(w / s) clamped to [-127, 127] for
int8, or (w / s) cast to float8_e4m3fn (round to nearest even); w ~ code * s. An all-zero group
gets s = 1 (codes 0). Scales are float32. Error bound: int8 |w - w~| <= s / 2 per value; e4m3
keeps 3 mantissa bits, a relative error <= 2^-4 for normal values.

On disk a quantized table is two checksummed DiskTable files (engram.memory.offload): the codes
(`NAME.json`/`NAME.bin`, dtype int8 or float8_e4m3fn) and the scales (`NAME.scales.json`/`.bin`,
float32 [rows, groups]); the codes' header names the scheme. Both are memory-mapped and each
block is crc-checked on first touch, like any disk table. Inference only (no gradients).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from .offload import DiskTable, _gather_rows, _paths, checkpoint_chunks, checkpoint_table_layers
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


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [..., E] and scales [..., E / group] -> values [..., E] of `dtype`."""
    groups = scales.shape[-1]
    x = codes.float().unflatten(-1, (groups, codes.shape[-1] // groups)) * scales.float().unsqueeze(-1)
    return x.flatten(-2).to(dtype)


class QuantizedTable(MemoryTable):
    """Codes and scales of every row, each either a CPU/device tensor or a `DiskTable`; the rows a
    gather asks for are dequantized to `out_dtype` on the device of `offsets`."""

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, codes: torch.Tensor | DiskTable,
                 scales: torch.Tensor | DiskTable, kind: str, group: int | None, *,
                 out_dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__(table_sizes, embedding_dim, device=device)
        rows = lambda t: t.num_rows if isinstance(t, DiskTable) else t.shape[0]  # noqa: E731
        if rows(codes) != self.num_rows or rows(scales) != self.num_rows:
            raise ValueError(f"codes and scales must have {self.num_rows} rows (sum of table_sizes), got "
                             f"{rows(codes)} and {rows(scales)}")
        self.codes, self.scales, self.kind, self.group, self.out_dtype = codes, scales, kind, group, out_dtype
        self.asynchronous = isinstance(codes, DiskTable)  # rows from a file: prefetch in the background

    @classmethod
    def quantize(cls, weight: torch.Tensor, table_sizes: Sequence[int], kind: str, group: int | None = None,
                 **kwargs) -> "QuantizedTable":
        codes, scales = quantize_rows(weight, kind, group)
        return cls(table_sizes, weight.shape[1], codes, scales, kind, group, device=weight.device, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales together."""
        size = lambda t: t.rows_NE.nbytes if isinstance(t, DiskTable) else t.nbytes  # noqa: E731
        return size(self.codes) + size(self.scales)

    def _rows(self, source, flat_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(source, DiskTable):
            return source.gather(flat_ids)
        if source.device == flat_ids.device or source.device.type != "cpu":
            return source[flat_ids.to(source.device)].to(flat_ids.device)
        return _gather_rows(source, flat_ids, flat_ids.device)

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        for source in (self.codes, self.scales):  # disk sources deliver to our device
            if isinstance(source, DiskTable):
                source.follow(self.offsets.device)
        return dequantize(self._rows(self.codes, flat_ids), self._rows(self.scales, flat_ids), self.out_dtype)

    def _apply(self, fn, recurse=True):  # resident codes follow .to(device); disk ones stay mapped
        super()._apply(fn, recurse)
        for name in ("codes", "scales"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                moved = fn(t)
                setattr(self, name, moved if moved.dtype == t.dtype else t.to(moved.device))
        return self

    # ------------------------------------------------------------------ disk
    @staticmethod
    def write(path_stem: str | os.PathLike, weight: torch.Tensor | Callable[[], Iterable[torch.Tensor]],
              table_sizes: Sequence[int], kind: str, group: int | None = None) -> Path:
        """Quantize rows [R, E] (or the chunks a callable yields, read twice: once for the scales,
        once for the codes, so a big table is never whole in memory) and write codes + scales as
        two checksummed disk tables."""
        chunks = (lambda: [weight]) if isinstance(weight, torch.Tensor) else weight
        json_path, _ = _paths(path_stem)
        stem = json_path.with_suffix("")
        # scales first: a codes file is never there without its scales
        DiskTable.write(_scales_stem(stem), (quantize_rows(c, kind, group)[1] for c in chunks()), table_sizes)
        DiskTable.write(stem, (quantize_rows(c, kind, group)[0] for c in chunks()), table_sizes,
                        extra={"quantization": {"kind": kind, "group": group, "scales": _scales_stem(stem).name}})
        return stem

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, layer_id: int, out_stem: str | os.PathLike,
                        kind: str, group: int | None = None, **open_kwargs) -> "QuantizedTable":
        """Quantize Engram layer `layer_id` of a model folder chunk by chunk into `out_stem`; open it."""
        sizes, _ = checkpoint_chunks(checkpoint_dir, layer_id, None)
        stem = cls.write(out_stem, lambda: checkpoint_chunks(checkpoint_dir, layer_id, None)[1], sizes, kind, group)
        return cls.open(stem, **open_kwargs)

    @classmethod
    def open(cls, path_stem: str | os.PathLike, *, device: torch.device | str | None = None,
             release_every: int | None = None, out_dtype: torch.dtype = torch.float32) -> "QuantizedTable":
        json_path, _ = _paths(path_stem)
        stem = json_path.with_suffix("")
        q = quantization_of(stem)
        if q is None:
            raise ValueError(f"{json_path} is not a quantized table (its header has no quantization); open it with "
                             "DiskTable.open")
        codes = DiskTable.open(stem, release_every=release_every, codes=True)
        scales = DiskTable.open(stem.with_name(q["scales"]), release_every=release_every)
        expect = codes.embedding_dim // (q["group"] or codes.embedding_dim)
        if scales.embedding_dim != expect or scales.table_sizes != codes.table_sizes:
            raise ValueError(f"{stem}: the scales file does not fit the codes ({scales.embedding_dim} scales per row, "
                             f"expected {expect}); rewrite the table with engram offload --dtype {q['kind']}")
        return cls(codes.table_sizes, codes.embedding_dim, codes, scales, q["kind"], q["group"], device=device,
                   out_dtype=out_dtype)

    def extra_repr(self) -> str:
        where = "disk" if isinstance(self.codes, DiskTable) else str(self.codes.device)
        return (f"heads={len(self.table_sizes)}, rows={self.num_rows}, dim={self.embedding_dim}, kind={self.kind}, "
                f"group={self.group or 'row'}, {where}")


def _scales_stem(stem: Path) -> Path:
    return stem.with_name(stem.name + ".scales")


def quantization_of(path_stem: str | os.PathLike) -> dict | None:
    """The quantization a disk table's header names (None for a plain float table)."""
    json_path, _ = _paths(path_stem)
    try:
        return json.loads(json_path.read_text()).get("quantization")
    except (OSError, ValueError):
        return None


def convert_checkpoint_tables_quantized(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, kind: str,
                                        group: int | None = None) -> dict[int, Path]:
    """`convert_checkpoint_tables` for quantized tables: every layer to `out_dir/layer{i}` (codes)
    and `out_dir/layer{i}.scales`. Returns {layer_id: stem}."""
    out = {}
    for layer in checkpoint_table_layers(checkpoint_dir):
        out[layer] = QuantizedTable.from_checkpoint(checkpoint_dir, layer, Path(out_dir) / f"layer{layer}", kind,
                                                    group).codes.path.with_suffix("")
    return out
