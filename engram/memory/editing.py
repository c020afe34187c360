"""Editing table rows: which rows a text addresses, which of them it owns, and reversible,
replayable changes to them.

A text's n-grams address one row per (Engram layer, hash head, position). A row is the text's
to change only if nothing else lives there: `addressed_rows` marks each row with a reason to
leave it alone (the n-gram reaches before the start of the text; the n-gram is common in the
training split; other frequent n-grams share the row), decided from a `RowIndex`.

Every change is an `EditLog`: per row the layer, head, row, its n-gram, the reason, and sha256
of the row's bytes before and after; the new row values travel beside it (`edits.safetensors`)
so `replay` reproduces the edit bit for bit on the same parent, and refuses any other table.
`PatchedTable` trains only chosen rows: it overlays a small parameter on a frozen table, so
every other row is untouched by construction.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..hashing.ngram import NgramHasher
from .row_index import RowIndex, canonical_grams, head_offsets
from .in_memory import InMemoryTable
from .table import MemoryTable

BEFORE_START = "the n-gram reaches before the start of the text"
DEFAULT_MAX_COUNT = 64  # n-grams seen more often than this in training are general language, not one fact
DEFAULT_MAX_SHARED = 0.5  # a row is a text's when other frequent n-grams make at most this share of its reads


@dataclass
class AddressedRow:
    """One table row a text reads: where, through which n-gram, and whether it is the text's."""

    layer: int
    head: int
    row: int  # within the head's table
    flat_row: int  # in the layer's flat table (heads back to back)
    order: int
    gram_ids: list[int]  # compressed ids of the n-gram (pad before the text start)
    positions: list[int]  # token positions of the text that read the row
    reads: int  # positions of the indexed training split that read the row
    gram_count: int  # occurrences of this n-gram in the training split (0: rarer than the index's min_count)
    partners: list[tuple[list[int], int]] = field(default_factory=list)  # other frequent n-grams on the row
    skip: str | None = None  # why the row is not the text's to change (None: it is)


def addressed_rows(hasher: NgramHasher, compressed_ids: Sequence[int], index: RowIndex, *,
                   max_count: int = DEFAULT_MAX_COUNT, max_shared: float = DEFAULT_MAX_SHARED
                   ) -> list[AddressedRow]:
    """Every distinct (layer, head, row) the text reads, with the reason to leave it alone:
    the n-gram reaches before the text's start; it occurs more than `max_count` times in
    training (general language, not this text); or more than `max_shared` of the row's training
    reads come from other frequent n-grams (small tables share most rows: with K heads per
    order an n-gram is its combination of rows, and resetting a shared row costs its partners
    1/K of their signal)."""
    index.check_layout(hasher.layout)
    ids = np.asarray(compressed_ids, dtype=np.int64)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError("the text has no tokens; give a non-empty text")
    layout = hasher.layout
    rows = {layer: r[0] for layer, r in hasher.hash(torch.from_numpy(ids)[None]).items()}
    padded = np.concatenate([np.full(layout.max_ngram_size - 1, layout.pad_id), ids])
    found: dict[tuple[int, int, int], AddressedRow] = {}
    for layer, rows_TH in rows.items():
        offsets = head_offsets(layout, layer)
        for head, m in enumerate(index.orders):
            for t in range(len(ids)):
                key = (layer, head, int(rows_TH[t, head]))
                seen = found.get(key)
                if seen is not None:
                    seen.positions.append(t)
                    if not (seen.skip == BEFORE_START and t >= m - 1):
                        continue  # a row first read by a gram before the start, read again inside the text:
                start = t + layout.max_ngram_size - m  # judge it by the gram inside
                gram = canonical_grams(padded[None, start:start + m], layout)[0]
                entry = _judge(index, layer, head, key[2], int(offsets[head] + key[2]), m, gram, t, max_count,
                               max_shared)
                if seen is not None:
                    entry.positions = seen.positions
                found[key] = entry
    return sorted(found.values(), key=lambda r: (r.layer, r.head, r.row))


def _judge(index: RowIndex, layer: int, head: int, row: int, flat_row: int, m: int, gram: np.ndarray, t: int,
           max_count: int, max_shared: float) -> AddressedRow:
    partners, counts = index.partners(layer, head, row)
    others = [(g.tolist(), int(c)) for g, c in zip(partners, counts) if not np.array_equal(g, gram)]
    own = index.count(gram)
    entry = AddressedRow(layer, head, row, flat_row, m, gram.tolist(), [t], int(index.reads[layer][flat_row]),
                         own, others)
    if t < m - 1:
        entry.skip = BEFORE_START
    elif own > max_count:
        entry.skip = f"common n-gram: {own} times in training (> max_count {max_count})"
    elif (share := sum(c for _, c in others) / max(entry.reads, 1)) > max_shared:
        entry.skip = f"shared: {share:.0%} of its training reads are {len(others)} other frequent n-gram(s)"
    return entry


def row_sha256(table: InMemoryTable, flat_rows: Sequence[int]) -> list[str]:
    """sha256 of each row's stored bytes (its dtype as stored)."""
    w = table.weight.detach()
    return [hashlib.sha256(w[int(r)].contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()
            for r in flat_rows]


def editable_table(table: nn.Module, layer: int) -> InMemoryTable:
    if not isinstance(table, InMemoryTable):
        raise ValueError(f"Engram layer {layer} is served by a {type(table).__name__}; edit the run's own "
                         "checkpoint (load it without --tables), then offload the edited run")
    return table


def fill_value(table: InMemoryTable, head: int, mode: str, reads: np.ndarray | None) -> torch.Tensor:
    """The value a forgotten row of `head` gets: zeros, or (`mean`) the mean of the head's rows
    that training read (all its rows when `reads` is None)."""
    if mode == "zero":
        return torch.zeros(table.embedding_dim, dtype=table.weight.dtype, device=table.weight.device)
    if mode != "mean":
        raise ValueError(f"mode must be 'zero' or 'mean', got {mode!r}")
    start = int(table.offsets[head])
    w = table.weight.detach()[start:start + table.table_sizes[head]]
    if reads is not None:
        used = torch.from_numpy(reads[start:start + table.table_sizes[head]] > 0).to(w.device)
        w = w[used] if bool(used.any()) else w
    return w.float().mean(0).to(table.weight.dtype)


@dataclass
class EditLog:
    """What an edit did (JSON) and the rows it wrote ({layer: (flat rows, values)})."""

    op: str
    detail: dict[str, Any]
    changed: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **self.detail, "changed_rows": len(self.changed), "skipped_rows": len(self.skipped),
                "changed": self.changed, "skipped": self.skipped}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer, (rows, values) in self.values.items():
            out[f"layer{layer}.rows"] = rows.cpu().contiguous()
            out[f"layer{layer}.values"] = values.detach().cpu().contiguous()
        return out


def _entry(r: AddressedRow, decode: Callable[[list[int]], str]) -> dict[str, Any]:
    d = asdict(r)
    d["gram"] = decode(r.gram_ids)
    d["partners"] = [{"gram": decode(g), "gram_ids": g, "count": c} for g, c in r.partners[:5]]
    d["positions"] = r.positions[:16]
    return d


def record_rows(op: str, tables: dict[int, InMemoryTable], chosen: list[AddressedRow], skipped: list[AddressedRow],
                before: dict[int, list[str]], detail: dict[str, Any], decode: Callable[[list[int]], str],
                reason: str) -> EditLog:
    """An EditLog of rows already changed in `tables` (`before`: their sha256 before, per layer,
    in the order of `chosen`)."""
    changed, values = [], {}
    for layer, table in tables.items():
        mine = [r for r in chosen if r.layer == layer]
        if not mine:
            continue
        flat = torch.tensor([r.flat_row for r in mine], dtype=torch.int64)
        after = row_sha256(table, flat.tolist())
        for r, b, a in zip(mine, before[layer], after):
            changed.append({**_entry(r, decode), "reason": reason, "before_sha256": b, "after_sha256": a})
        values[layer] = (flat, table.weight.detach()[flat.to(table.weight.device)].clone())
    return EditLog(op, detail, changed, [{**_entry(r, decode), "reason": r.skip} for r in skipped], values)


def forget_rows(tables: dict[int, nn.Module], rows: list[AddressedRow], *, mode: str = "zero", force: bool = False,
                index: RowIndex | None = None, decode: Callable[[list[int]], str] = str) -> EditLog:
    """Reset the rows the text owns (all addressed rows with `force`) in place; the log names
    each row changed and each row left alone, with why."""
    chosen, skipped = split_rows(rows, force)
    if not chosen:
        reasons = "; ".join(f"{n} {kind}" for kind, n in count_reasons(r.skip for r in skipped).items())
        raise ValueError(f"none of the text's {len(rows)} rows is its own to reset ({reasons}); pass force=True "
                         "(--force) to reset them anyway")
    edited = {layer: editable_table(tables[layer], layer) for layer in sorted({r.layer for r in chosen})}
    before = {}
    with torch.no_grad():
        for layer, table in edited.items():
            mine = [r for r in chosen if r.layer == layer]
            before[layer] = row_sha256(table, [r.flat_row for r in mine])
            reads = None if index is None else index.reads[layer]
            fills = {h: fill_value(table, h, mode, reads) for h in sorted({r.head for r in mine})}  # before any change
            for r in mine:
                table.weight[r.flat_row] = fills[r.head]
    return record_rows("forget", edited, chosen, skipped, before, {"mode": mode, "force": force}, decode,
                       f"forget ({mode})")


def split_rows(rows: list[AddressedRow], force: bool) -> tuple[list[AddressedRow], list[AddressedRow]]:
    """(rows to change, rows left alone): the text's own rows, or every row with `force`."""
    chosen = [r for r in rows if force or r.skip is None]
    return chosen, [r for r in rows if not (force or r.skip is None)]


def count_reasons(reasons: Iterable[str | None]) -> dict[str, int]:
    """How many rows were left alone for each kind of reason (the text before a reason's colon)."""
    counts: dict[str, int] = {}
    for reason in reasons:
        kind = (reason or "").split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def replay(tables: dict[int, nn.Module], log: dict[str, Any], values: dict[str, torch.Tensor]) -> int:
    """Apply a saved edit (edit_log.json + edits.safetensors) to the parent's tables in place.
    Every row must hash to its logged `before_sha256` first and to `after_sha256` after.
    Returns the number of rows written."""
    by_layer: dict[int, list[dict]] = {}
    for e in log["changed"]:
        by_layer.setdefault(int(e["layer"]), []).append(e)
    n = 0
    with torch.no_grad():
        for layer, entries in by_layer.items():
            if layer not in tables:
                raise ValueError(f"the edit log changes Engram layer {layer}, which this model does not have")
            table = editable_table(tables[layer], layer)
            rows, vals = values[f"layer{layer}.rows"], values[f"layer{layer}.values"]
            flat = [int(e["flat_row"]) for e in entries]
            if rows.tolist() != flat:
                raise ValueError(f"edits.safetensors and edit_log.json disagree on the rows of layer {layer}")
            for e, have in zip(entries, row_sha256(table, flat)):
                if have != e["before_sha256"]:
                    raise ValueError(f"layer {layer} row {e['flat_row']} is not the row this edit was made on "
                                     "(its sha256 differs from before_sha256): replay it on the edit's parent run")
            table.weight[rows.to(table.weight.device)] = vals.to(table.weight.device, table.weight.dtype)
            for e, have in zip(entries, row_sha256(table, flat)):
                if have != e["after_sha256"]:
                    raise ValueError(f"replaying layer {layer} row {e['flat_row']} did not reproduce after_sha256")
            n += len(entries)
    return n


class PatchedTable(MemoryTable):
    """A frozen table with trainable values for a few flat rows: gathers read `values` where the
    id is one of `flat_rows` and the base table elsewhere. Training only `values` changes only
    those rows; `commit()` writes them into the base table."""

    def __init__(self, base: InMemoryTable, flat_rows: Sequence[int]) -> None:
        super().__init__(base.table_sizes, base.embedding_dim, device=base.offsets.device)
        self.validate_rows = base.validate_rows
        rows = torch.tensor(sorted({int(r) for r in flat_rows}), dtype=torch.int64, device=base.weight.device)
        if rows.numel() == 0:
            raise ValueError("no rows to train")
        self.base = base
        self.register_buffer("rows", rows, persistent=False)
        self.values = nn.Parameter(base.weight.detach()[rows].clone().float())

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        out = self.base.gather(flat_ids)
        slot = torch.searchsorted(self.rows, flat_ids).clamp(max=self.rows.numel() - 1)
        hit = self.rows[slot] == flat_ids
        return torch.where(hit.unsqueeze(-1), self.values[slot].to(out.dtype), out)

    @torch.no_grad()
    def commit(self) -> InMemoryTable:
        self.base.weight[self.rows] = self.values.to(self.base.weight.dtype)
        return self.base
