"""An overlay's lifecycle on runs: show what it holds, verify it against a run, merge overlays
into a new run (the edit materialized, bit-equal to applying them), drop one.

    overlay_show("overlays/x")                           # the manifest in brief
    overlay_verify("overlays/x", "runs/a")               # fits runs/a? (layout, parent, base rows)
    overlay_merge(["overlays/x", "overlays/y"], "runs/a", out="runs/a_xy")
    overlay_drop("overlays/x")                           # only a folder that is an overlay
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..memory.editing import EditLog, editable_table, row_sha256
from ..memory.overlay import OVERLAY_JSON, OVERLAY_ROWS, Overlay, OverlayError, apply_overlays, read_rows
from ..runs import check_output, checkpoint_identity
from .memory_ops import EditError, _save_edited, open_run


def overlay_show(folder: str | Path) -> dict[str, Any]:
    """What an overlay holds: rows per layer, bytes, its parent, the edit it records."""
    ov = _load(folder)
    log = ov.log
    return {"overlay": str(folder), "changed_rows": ov.changed_rows,
            "rows_by_layer": {layer: int(r.numel()) for layer, (r, _) in sorted(ov.rows.items())},
            "bytes": sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()),
            "rows_bytes": (Path(folder) / OVERLAY_ROWS).stat().st_size, "parent": ov.parent,
            "op": log.get("op"), "texts": log.get("summary", {}).get("texts"),
            "layout_layers": ov.layout.get("layer_ids"), "layout_seed": ov.layout.get("seed")}


def overlay_verify(folder: str | Path, run: str | Path) -> dict[str, Any]:
    """Check that an overlay fits a run: its layout, its parent and every base row it replaces
    (an `EditError` naming the first problem)."""
    ov = _load(folder)
    model, _, ckpt = open_run(run)
    try:
        apply_overlays(model, [ov], parent=checkpoint_identity(ckpt))
    except OverlayError as e:
        raise EditError(str(e)) from None
    return {"overlay": str(folder), "run": str(run), "checkpoint": str(ckpt), "rows": ov.changed_rows, "fits": True}


def overlay_merge(folders: Sequence[str | Path], run: str | Path, *, out: str | Path,
                  force: bool = False) -> dict[str, Any]:
    """Write `run` with the overlays applied in order as a new edited run (its edit log lists
    every row: `engram memory replay` reproduces it). Bit-equal to serving `run` with them."""
    check_output(out, sources=[run, *folders], what="edited run")
    overlays = [_load(f) for f in folders]
    model, run_json, ckpt = open_run(run)
    plain = {layer: editable_table(model.blocks[layer].engram.table, layer) for layer in model.engram_layers}
    try:  # the same checks as serving them: layout, parent, base rows (in stacking order)
        apply_overlays(model, overlays, parent=checkpoint_identity(ckpt), force=force)
    except OverlayError as e:
        raise EditError(str(e)) from None
    rows_by_layer: dict[int, list[int]] = {}
    for ov in overlays:
        for layer, (rows, _) in ov.rows.items():
            rows_by_layer[layer] = sorted(set(rows_by_layer.get(layer, [])) | set(rows.tolist()))
    changed, values = [], {}
    with torch.no_grad():
        for layer, flat in sorted(rows_by_layer.items()):
            index = torch.tensor(flat, dtype=torch.int64)
            served = read_rows(model.blocks[layer].engram.table, index)  # what the stacked overlays serve
            table = plain[layer]
            before = row_sha256(table, flat)
            table.weight[index.to(table.weight.device)] = served.to(table.weight.device, table.weight.dtype)
            model.set_table(layer, table)  # the plain table again, the rows written in
            for row, b, a in zip(flat, before, row_sha256(table, flat)):
                changed.append({"layer": layer, "flat_row": row, "reason": "merged overlay", "before_sha256": b,
                                "after_sha256": a})
            values[layer] = (index, table.weight.detach()[index.to(table.weight.device)].clone())
    log = EditLog("merge", {"overlays": [str(f) for f in folders], "force": force}, changed, [], values)
    summary = {"overlays": [str(f) for f in folders]}
    _save_edited(Path(out), Path(run), run_json, ckpt, model, log, summary)
    return {"out": str(out), "changed": len(changed), "overlays": len(overlays)}


def overlay_drop(folder: str | Path) -> dict[str, Any]:
    """Delete an overlay folder, and nothing that is not one (it must hold exactly the overlay's
    two files)."""
    folder = Path(folder)
    _load(folder)
    extra = sorted(p.name for p in folder.iterdir() if p.name not in (OVERLAY_JSON, OVERLAY_ROWS))
    if extra:
        raise EditError(f"{folder} holds more than an overlay ({', '.join(extra[:3])}); not deleted")
    shutil.rmtree(folder)
    return {"dropped": str(folder)}


def _load(folder: str | Path) -> Overlay:
    try:
        return Overlay.load(folder)
    except OverlayError as e:
        raise EditError(str(e)) from None


__all__ = ["overlay_drop", "overlay_merge", "overlay_show", "overlay_verify"]
