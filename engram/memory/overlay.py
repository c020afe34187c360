"""Memory overlays: an edit kept as a small file and applied at lookup time, over any table.

An edit (`engram memory forget|write`) changes a few hundred rows of tables that may hold
billions. Written as a new run it copies them all; as an overlay it keeps only what changed:
- `overlay.safetensors`: per Engram layer the flat row ids [N] and their new values [N, E];
- `overlay.json`: the manifest: the hash layout the rows are addressed in (every field, the
  multipliers and primes included), the parent's identity (run, checkpoint, the sha256 of its
  weights file), the sha256 of each base row before the edit, the edit log, and the sha256 and
  size of the safetensors file. Written staged and renamed, fsynced (`durable.staged_dir`).

`OverlayTable` wraps any `MemoryTable` (resident, host, disk, quantized, cached, sharded)
without copying or changing it: a gather reads the base and replaces the overlay's rows.
`apply_overlays` stacks overlays in the order given (a later one wins on a row both change),
after checking each: its layout against the model's, its parent against the model's checkpoint,
and each base row against its recorded sha256 (what the table returns for it, in the stored
dtype), each refused by name unless `force`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..durable import file_sha256, staged_dir
from ..hashing.layout import HashLayout
from .table import MemoryTable

OVERLAY_JSON, OVERLAY_ROWS = "overlay.json", "overlay.safetensors"
FORMAT = "engram-overlay/1"


class OverlayError(ValueError):
    """An overlay that cannot be read, or does not belong to the model it is applied to."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_sha256(values: torch.Tensor) -> list[str]:
    """sha256 of each row's bytes [N, E] (its dtype as given)."""
    v = values.detach().contiguous().cpu()
    return [_sha256_bytes(v[i].view(torch.uint8).numpy().tobytes()) for i in range(v.shape[0])]


@dataclass
class Overlay:
    """Rows that replace a parent's rows: {layer: (flat rows [N] int64 sorted, values [N, E])}."""

    layout: dict[str, Any]
    parent: dict[str, Any]
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]]
    before_sha256: dict[int, list[str]]
    log: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def changed_rows(self) -> int:
        return sum(int(r.numel()) for r, _ in self.rows.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (rows, values) in sorted(self.rows.items()):
            out[f"layer{layer}.rows"] = rows.detach().cpu().contiguous()
            out[f"layer{layer}.values"] = values.detach().cpu().contiguous()
        return out

    def save(self, out: str | os.PathLike) -> Path:
        """Write the overlay folder (new; staged, checksummed, fsynced). Returns its path."""
        out = Path(out)
        with staged_dir(out) as tmp:
            save_file(self.tensors(), str(tmp / OVERLAY_ROWS), metadata={"format": FORMAT})
            manifest = {"format": FORMAT, "layout": self.layout, "parent": self.parent,
                        "before_sha256": {str(k): v for k, v in sorted(self.before_sha256.items())},
                        "changed_rows": self.changed_rows, "rows_file": {
                            "name": OVERLAY_ROWS, "sha256": file_sha256(tmp / OVERLAY_ROWS),
                            "bytes": (tmp / OVERLAY_ROWS).stat().st_size}, "log": self.log}
            (tmp / OVERLAY_JSON).write_text(json.dumps(manifest, indent=1))
        self.path = out
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Overlay":
        """Read and verify an overlay folder; a missing, corrupt or mismatched file is an
        `OverlayError` naming it."""
        folder = Path(folder)
        manifest_path, rows_path = folder / OVERLAY_JSON, folder / OVERLAY_ROWS
        if not manifest_path.is_file() or not rows_path.is_file():
            raise OverlayError(f"{folder} is not an overlay (it needs {OVERLAY_JSON} and {OVERLAY_ROWS}; make one "
                               "with engram memory forget|write ... --overlay DIR)")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise OverlayError(f"{manifest_path} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT:
            raise OverlayError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if file_sha256(rows_path) != manifest["rows_file"]["sha256"]:
            raise OverlayError(f"{rows_path} does not match the sha256 in {OVERLAY_JSON} (corrupt or truncated)")
        try:
            tensors = load_file(str(rows_path))
        except SafetensorError as e:
            raise OverlayError(f"{rows_path} cannot be read ({e})") from None
        before = {int(k): v for k, v in manifest["before_sha256"].items()}
        rows = {}
        for layer in before:
            r, v = tensors.get(f"layer{layer}.rows"), tensors.get(f"layer{layer}.values")
            if (r is None or v is None or r.dim() != 1 or v.dim() != 2 or r.numel() != v.shape[0]
                    or r.numel() != len(before[layer])):
                raise OverlayError(f"{rows_path}: the rows of layer {layer} do not match {OVERLAY_JSON}")
            rows[layer] = (r, v)
        return cls(manifest["layout"], manifest["parent"], rows, before, manifest.get("log", {}), folder)


def from_edit(log, layout: HashLayout, parent: dict[str, Any], before: dict[int, list[str]] | None = None) -> Overlay:
    """The overlay of an `EditLog` (rows and values it wrote; the before-hashes it recorded)."""
    if before is None:
        before = {}
        for entry in log.changed:
            before.setdefault(int(entry["layer"]), []).append(entry["before_sha256"])
    rows = {}
    for layer, (flat, values) in log.values.items():
        order = torch.argsort(flat)
        rows[layer] = (flat[order].clone(), values[order].clone())
        before[layer] = [before[layer][i] for i in order.tolist()]
    return Overlay(layout.to_dict(), parent, rows, before, log.to_dict())


def check_overlay_rows(base: MemoryTable, rows: torch.Tensor, values: torch.Tensor, where: str) -> None:
    """An overlay's rows must be flat ids of `base`, sorted and unique, one value row each."""
    if rows.dim() != 1 or values.shape != (rows.numel(), base.embedding_dim):
        raise OverlayError(f"{where}: rows {tuple(rows.shape)} and values {tuple(values.shape)} do not fit a "
                           f"table of {base.num_rows} rows x {base.embedding_dim}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= base.num_rows):
        raise OverlayError(f"{where}: rows reach {int(rows.max())}, outside the table's {base.num_rows} rows")
    if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
        raise OverlayError(f"{where}: rows must be sorted and unique (a gather finds them by binary search over "
                           "sorted, unique ids)")


class OverlayTable(MemoryTable):
    """`base` with some flat rows replaced: gathers read the base, then put `values` where the
    id is one of `rows` (sorted, unique). Neither the base nor its storage is copied or changed."""

    def __init__(self, base: MemoryTable, rows: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(base.table_sizes, base.embedding_dim, device=base.offsets.device)
        check_overlay_rows(base, rows, values, "overlay")
        self.base = base
        self.validate_rows = base.validate_rows
        self.asynchronous = base.asynchronous
        self.register_buffer("rows", rows.to(base.offsets.device), persistent=False)
        self.register_buffer("values", values.detach().to(base.offsets.device), persistent=False)

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        out = self.base.gather(flat_ids)
        if self.rows.numel() == 0:
            return out
        rows, values = self.rows.to(flat_ids.device), self.values.to(out.device)
        slot = torch.searchsorted(rows, flat_ids).clamp(max=rows.numel() - 1)
        hit = rows[slot] == flat_ids
        return torch.where(hit.unsqueeze(-1), values[slot].to(out.dtype), out)

    def stored_dtype(self) -> torch.dtype:
        return stored_dtype(self.base)


def stored_dtype(table: MemoryTable) -> torch.dtype:
    """The dtype a table's rows were written in (what an edit's before-hashes are taken of)."""
    inner = getattr(table, "stored_dtype", None)
    if callable(inner):
        return inner()
    weight = getattr(table, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else torch.float32


def read_rows(table: MemoryTable, flat_rows: torch.Tensor) -> torch.Tensor:
    """The rows a table serves for these flat ids, in its stored dtype [N, E]."""
    with torch.no_grad():
        return table.gather(flat_rows.to(table.offsets.device)).to(stored_dtype(table))


def check_overlay(ov: Overlay, layout: HashLayout, tables: dict[int, MemoryTable], *,
                  parent: dict[str, Any] | None = None, force: bool = False) -> None:
    """Refuse, by name, an overlay that does not fit these tables ({layer: table}): another
    hash layout (always), another parent (`parent`: the model's checkpoint identity), or base
    rows that differ from their recorded sha256 (both unless `force`)."""
    where = str(ov.path) if ov.path else "the overlay"
    try:
        HashLayout.from_dict(ov.layout).check_matches(layout, "the model's")
    except ValueError as e:
        raise OverlayError(f"{where} was made for another hash layout: {e}") from None
    if parent is not None and not force:
        mine, theirs = parent.get("weights_sha256"), ov.parent.get("weights_sha256")
        if mine and theirs and mine != theirs:
            raise OverlayError(f"{where} was made on {ov.parent.get('checkpoint')} (weights sha256 "
                               f"{theirs[:12]}), not on this model's {parent.get('checkpoint')} ({mine[:12]}); "
                               "apply it to its parent, or pass --force")
    for layer, (rows, _) in ov.rows.items():
        if layer not in tables:
            raise OverlayError(f"{where} changes Engram layer {layer}, which this model does not have")
        if not force:
            have = rows_sha256(read_rows(tables[layer], rows))
            bad = [int(r) for r, a, b in zip(rows.tolist(), have, ov.before_sha256[layer]) if a != b]
            if bad:
                raise OverlayError(f"{where}: {len(bad)} of its {rows.numel()} base rows in layer {layer} differ "
                                   f"from the rows it was made on (first: flat row {bad[0]}); apply it to its "
                                   "parent, or pass --force to apply it anyway")


def apply_overlays(model, overlays: Sequence[Overlay], *, parent: dict[str, Any] | None = None,
                   force: bool = False) -> list[Overlay]:
    """Stack `overlays` (in order; a later one wins) over `model`'s tables, in place, each
    checked by `check_overlay` against the tables as stacked so far."""
    if model.layout is None:
        raise OverlayError("this model has no Engram tables to overlay")
    for ov in overlays:
        tables = {layer: model.blocks[layer].engram.table for layer in model.engram_layers}
        check_overlay(ov, model.layout, tables, parent=parent, force=force)
        for layer, (rows, values) in ov.rows.items():
            table = tables[layer]
            model.set_table(layer, OverlayTable(table, rows, values.to(stored_dtype(table))))
    return list(overlays)
