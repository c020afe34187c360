"""Run-level memory operations: index, locate, forget, write and replay on training runs.

    index_run(run)                                  # once: RUN/memory_index (reads, partners)
    locate(run, "Ada Lovelace was born in")         # per position and layer: n-grams, rows, reads
    forget(run, texts, out="runs/forgot")           # a new run with the text's own rows reset
    write(run, texts, steps=50, out="runs/wrote")   # a new run with only those rows fine-tuned
    replay("runs/forgot")                           # the edit log, applied to the parent again

An edit never touches its source: the model is loaded, changed in memory and saved as a new
run (run.json names the parent; the checkpoint carries edit_log.json and edits.safetensors),
written atomically. Edits of edited runs chain; each run records the whole history.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from ..durable import read_safetensors, staged_dir
from ..eval import evaluate, held_out_loss
from ..memory.editing import (DEFAULT_MAX_COUNT, DEFAULT_MAX_SHARED, AddressedRow, EditLog, PatchedTable,
                              addressed_rows, forget_rows, record_rows, replay as replay_log, row_sha256,
                              split_rows)
from ..memory.overlay import OVERLAY_ROWS, from_edit
from ..memory.row_index import RowIndex, RowIndexError
from ..model.transformer import EngramLM
from ..runs import (Checkpoints, RunError, check_output, checkpoint_identity, load_checkpoint, newest_checkpoint,
                    read_run, run_data as _run_data, write_run)
from ..data.dataset import PreparedData
from ..train.trainer import Trainer, TrainingDiverged

INDEX_DIR = "memory_index"
EDIT_LOG, EDIT_VALUES = "edit_log.json", "edits.safetensors"


class EditError(ValueError):
    """A memory operation that cannot be done as asked (the message says why and what to do)."""


# ---------------------------------------------------------------------------- runs
def open_run(run: str | Path, fallback: bool = True) -> tuple[EngramLM, dict[str, Any], Path]:
    """(model, run.json, checkpoint) of a run's newest good checkpoint, checked to have a
    memory that rows of a text can belong to. When a newer checkpoint is corrupt, an edit
    (`fallback=False`) refuses, naming it and the one it would use instead."""
    run = Path(run)
    bad: list[str] = []
    try:
        run_json, ckpt = read_run(run), newest_checkpoint(run, warn=bad.append)
    except RunError as e:
        raise EditError(str(e)) from None
    if bad and not fallback:
        raise EditError(f"{bad[0]}; the newest good checkpoint is {ckpt}: pass --fall-back to edit that one, "
                        "or repair the run")
    model = load_checkpoint(ckpt)[0].eval()
    if model.hasher is None:
        raise EditError(f"{run} is a model without Engram layers: it has no memory to locate or edit")
    if model.config.engram.single_row:
        raise EditError(f"{run} is a capacity-1 model: one row per head holds every n-gram, so no row "
                        "belongs to a text")
    return model, run_json, ckpt


def run_data(run: Path, run_json: dict[str, Any]) -> PreparedData:
    if not run_json.get("data_dir"):
        raise EditError(f"{run}/run.json names no dataset; the index needs the training split")
    return _run_data(run_json)


def _index_folder(run: Path, run_json: dict[str, Any]) -> Path:
    """RUN/memory_index, or, for an edited run without one, its first ancestor's (the layout and
    training split are the parent's)."""
    here = run / INDEX_DIR
    parent = run_json.get("parent", {}).get("run")
    if not (here / "index.json").is_file() and parent and (Path(parent) / INDEX_DIR / "index.json").is_file():
        return Path(parent) / INDEX_DIR
    return here


def load_index(run: Path, run_json: dict[str, Any], model: EngramLM, index: str | Path | None = None) -> RowIndex:
    folder = Path(index) if index else _index_folder(run, run_json)
    if not index and not (folder / "index.json").is_file():
        raise EditError(f"{run} has no row index yet; build it once with: engram memory index {run}")
    loaded = RowIndex.load(folder)
    loaded.check_layout(model.layout, str(run))
    counted = loaded.source.get("data")
    if counted is not None and run_json.get("data_dir") and counted != run_data(run, run_json).fingerprint():
        raise EditError(f"the row index in {folder} counts another training split than {run}'s "
                        f"({loaded.source.get('data_dir')}); rebuild it with: engram memory index {run}")
    return loaded


def index_run(run: str | Path, *, min_count: int = 2, chunk_tokens: int = 1 << 20, progress: bool = True) -> Path:
    """Build the row index of a run over its training split (RUN/memory_index)."""
    from tqdm.auto import tqdm

    run = Path(run)
    model, run_json, ckpt = open_run(run)
    data = run_data(run, run_json)
    comp = model.compression.cpu().numpy()
    tokens = data.train.tokens
    train = run_json.get("train", {})
    seen = train.get("max_steps", 0) * train.get("batch_size", 0) * train.get("seq_len", 0)
    bar = tqdm(total=len(tokens), unit="tok", desc="indexing", disable=not progress)
    chunks = (comp[np.asarray(tokens[s:s + chunk_tokens], dtype=np.int64)] for s in range(0, len(tokens), chunk_tokens))
    index = RowIndex.build(model.hasher, chunks, min_count=min_count, progress=bar.update,
                           source={"run": str(run), "checkpoint": str(ckpt), "data_dir": str(data.root),
                                   "data": data.fingerprint(), "epochs_trained": seen / max(len(tokens), 1)})
    bar.close()
    return index.save(run / INDEX_DIR)


# ---------------------------------------------------------------------------- text
def _texts(texts: str | Sequence[str]) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise EditError("the text is empty; pass the phrase or fact to act on")
    return texts


def _encode(data: PreparedData, text: str, max_len: int) -> list[int]:
    ids = data.tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:
        raise EditError(f"{text!r} has no tokens under the run's tokenizer")
    if len(ids) > max_len:
        raise EditError(f"a text of {len(ids)} tokens is longer than the model's max_seq_len {max_len}; split it "
                        "into several --text (one per line of --text-file)")
    return ids


def decoder(data: PreparedData, model: EngramLM) -> Callable[[Sequence[int]], str]:
    """Compressed ids -> text, each through the smallest original id that maps to it (the
    compressed vocabulary merges case and spacing variants: this shows one of them)."""
    comp = model.compression.cpu().numpy()
    first = np.full(int(comp.max()) + 1, -1, dtype=np.int64)
    for raw in range(len(comp) - 1, -1, -1):
        first[comp[raw]] = raw
    return lambda ids: data.tokenizer.decode([int(first[i]) for i in ids], skip_special_tokens=False)


def rows_for_texts(model: EngramLM, data: PreparedData, index: RowIndex, texts: list[str], max_count: int,
                   max_shared: float, *, inputs_only: bool = False) -> tuple[list[AddressedRow], list[list[int]]]:
    """The distinct rows all texts address (a row any text must leave alone is left alone), and
    each text's token ids. `inputs_only`: the rows a next-token loss on the text reads (all
    tokens but the last, which predicts nothing in the text)."""
    merged: dict[tuple[int, int, int], AddressedRow] = {}
    ids = [_encode(data, t, model.config.max_seq_len) for t in texts]
    for t_ids in ids:
        if inputs_only and len(t_ids) < 2:
            raise EditError(f"{data.tokenizer.decode(t_ids)!r} is one token: there is nothing to predict in it")
        cids = model.compression.cpu()[torch.tensor(t_ids[:-1] if inputs_only else t_ids)].numpy()
        for r in addressed_rows(model.hasher, cids, index, max_count=max_count, max_shared=max_shared):
            key = (r.layer, r.head, r.row)
            if key not in merged or (r.skip and not merged[key].skip):
                merged[key] = r
    return sorted(merged.values(), key=lambda r: (r.layer, r.head, r.row)), ids


def locate(run: str | Path, text: str, *, index: str | Path | None = None, max_count: int = DEFAULT_MAX_COUNT,
           max_shared: float = DEFAULT_MAX_SHARED) -> dict[str, Any]:
    """What the memory holds for `text`: per token position and Engram layer, each head's
    n-gram, row, training reads and collision partners, and whether the text owns the row."""
    run = Path(run)
    model, run_json, _ = open_run(run)
    data = run_data(run, run_json)
    idx = load_index(run, run_json, model, index)
    (text,) = _texts(text)
    ids = _encode(data, text, max_len=1 << 62)  # located by hashing alone: any length
    decode = decoder(data, model)
    rows = addressed_rows(model.hasher, model.compression.cpu()[torch.tensor(ids)].numpy(), idx,
                          max_count=max_count, max_shared=max_shared)
    positions: list[dict[str, Any]] = [{"position": t, "token": data.tokenizer.decode([i]), "layers": {}}
                                       for t, i in enumerate(ids)]
    for r in rows:
        for t in r.positions:
            positions[t]["layers"].setdefault(str(r.layer), []).append({
                "head": r.head, "order": r.order, "gram": decode(r.gram_ids), "row": r.row, "reads": r.reads,
                "gram_count": r.gram_count, "owned": r.skip is None, "why_not": r.skip,
                "partners": [{"gram": decode(g), "count": c} for g, c in r.partners[:3]]})
    for p in positions:
        for heads in p["layers"].values():
            heads.sort(key=lambda h: h["head"])
    return {"run": str(run), "text": text, "index": idx.source, "rows": len(rows),
            "owned_rows": sum(r.skip is None for r in rows), "positions": positions}


def text_loss(model: EngramLM, ids: list[list[int]]) -> float:
    """Mean next-token cross-entropy over the texts (each a sequence of its own)."""
    windows = [torch.tensor(t)[None] for t in ids if len(t) >= 2]
    if not windows:
        raise EditError("the text needs at least two tokens to measure a loss on")
    return held_out_loss(lambda x: model(x).logits, windows)[0]


def _measure(model: EngramLM, data: PreparedData, ids: list[list[int]], seq_len: int, windows: int) -> dict:
    return {"text_loss": text_loss(model, ids),
            "held_out_loss": evaluate(model, data, min(seq_len, model.config.max_seq_len), windows)["val_loss"]}


# ---------------------------------------------------------------------------- edits
def _tables(model: EngramLM) -> dict[int, Any]:
    return {layer: model.blocks[layer].engram.table for layer in model.engram_layers}


def _save_edited(out: Path, parent: Path, parent_json: dict[str, Any], ckpt: Path, model: EngramLM, log: EditLog,
                 summary: dict[str, Any]) -> Path:
    """A new run folder: run.json (the parent's, with `parent` and the edit history) and one
    checkpoint holding the model, edit_log.json and edits.safetensors; atomic."""
    check_output(out, sources=[parent], what="edited run")
    step = int(ckpt.name.split("_")[-1])

    def edit_files(folder: Path) -> None:
        (folder / EDIT_LOG).write_text(json.dumps({**log.to_dict(), "summary": summary}, indent=1))
        save_file(log.tensors(), str(folder / EDIT_VALUES))

    with staged_dir(out) as tmp:
        Checkpoints(tmp, keep_last=1).save(step, model, None, {"edited_from": str(ckpt)}, extra=edit_files)
        record = {"op": log.op, "run": str(out), "changed_rows": len(log.changed), **summary}
        run_json = {**parent_json, "parent": {"run": str(parent), "checkpoint": str(ckpt)},
                    "edits": [*parent_json.get("edits", []), record], "resumable": False}
        write_run(tmp, run_json)
    return out


def _save_overlay(out: Path, parent: Path, ckpt: Path, model: EngramLM, log: EditLog,
                  summary: dict[str, Any]) -> int:
    """The edit as an overlay folder (`engram.memory.overlay`); returns the bytes of its rows."""
    check_output(out, sources=[parent], what="overlay")
    log.detail = {**log.detail, "summary": summary}
    overlay = from_edit(log, model.layout, {"run": str(parent), **checkpoint_identity(ckpt)})
    overlay.save(out)
    return (out / OVERLAY_ROWS).stat().st_size


def _save(out: Path, run: Path, run_json: dict[str, Any], ckpt: Path, model: EngramLM, log: EditLog,
          summary: dict[str, Any], overlay: bool) -> dict[str, Any]:
    if overlay:
        return {"overlay": True, "overlay_bytes": _save_overlay(out, run, ckpt, model, log, summary)}
    _save_edited(out, run, run_json, ckpt, model, log, summary)
    return {}


def forget(run: str | Path, texts: str | Sequence[str], *, out: str | Path, mode: str = "zero",
           force: bool = False, max_count: int = DEFAULT_MAX_COUNT, max_shared: float = DEFAULT_MAX_SHARED,
           index: str | Path | None = None, eval_windows: int = 16, overlay: bool = False,
           fallback: bool = False) -> dict[str, Any]:
    """Reset the rows the texts own (see `engram.memory.editing`) and save the model as a new run
    (or, with `overlay`, only the changed rows as an overlay folder); returns what changed, what
    was left alone and why, and the losses before and after. `fallback`: edit the newest good
    checkpoint when a newer one is corrupt (otherwise refused)."""
    run, out = Path(run), Path(out)
    check_output(out, sources=[run], what="overlay" if overlay else "edited run")
    model, run_json, ckpt = open_run(run, fallback)
    data, texts = run_data(run, run_json), _texts(texts)
    row_index = load_index(run, run_json, model, index)
    rows, ids = rows_for_texts(model, data, row_index, texts, max_count, max_shared)
    seq_len = run_json.get("train", {}).get("seq_len", model.config.max_seq_len)
    before = _measure(model, data, ids, seq_len, eval_windows)
    try:
        log = forget_rows(_tables(model), rows, mode=mode, force=force, index=row_index, decode=decoder(data, model))
    except ValueError as e:
        raise EditError(str(e)) from None
    after = _measure(model, data, ids, seq_len, eval_windows)
    summary = {"texts": texts, "max_count": max_count, "max_shared": max_shared, "before": before, "after": after}
    saved = _save(out, run, run_json, ckpt, model, log, summary, overlay)
    return {"out": str(out), "checkpoint": str(ckpt), "changed": len(log.changed), "skipped": len(log.skipped),
            **summary, "log": log.to_dict(), **saved}


def train_rows(model: EngramLM, ids: list[list[int]], rows: list[AddressedRow], *, steps: int, lr: float,
               skipped: list[AddressedRow] = (), seed: int = 0, decode: Callable = str,
               detail: dict[str, Any] | None = None) -> EditLog:
    """Fine-tune only `rows` of the model's tables, in place, on the texts' next-token loss
    (full-batch Adam; every other weight frozen by construction: see `PatchedTable`)."""
    if not rows:
        raise EditError("no rows to train")
    tables = _tables(model)
    layers = sorted({r.layer for r in rows})
    hashes = {layer: row_sha256(tables[layer], [r.flat_row for r in rows if r.layer == layer]) for layer in layers}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    patches = {layer: PatchedTable(tables[layer], [r.flat_row for r in rows if r.layer == layer]) for layer in layers}
    done = False
    try:
        for layer, patch in patches.items():
            model.set_table(layer, patch)
        torch.manual_seed(seed)
        batch = [torch.tensor(t)[None] for t in ids]  # each text a window of its own
        Trainer(model=model, optimizers=[torch.optim.Adam([p.values for p in patches.values()], lr=lr)],
                batches=lambda step: batch, max_steps=steps, grad_clip=float("inf"), balance_moe=False,
                train_mode=False, max_bad_steps=1, log=lambda m: None).fit()
        done = all(bool(torch.isfinite(p.values).all()) for p in patches.values())
    except TrainingDiverged:
        pass
    finally:  # the plain tables again: trained rows written in, or (after an error) untouched
        for layer, patch in patches.items():
            model.set_table(layer, patch.commit() if done else patch.base)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    if not done:
        raise EditError(f"training the rows at lr {lr} made them non-finite (NaN or infinity); nothing was written: "
                        "use a lower --lr")
    return record_rows("write", {layer: tables[layer] for layer in layers}, rows, list(skipped), hashes,
                       {"steps": steps, "lr": lr, **(detail or {})}, decode, f"write ({steps} steps)")


def write(run: str | Path, texts: str | Sequence[str], *, out: str | Path, steps: int = 50, lr: float = 0.05,
          force: bool = False, max_count: int = DEFAULT_MAX_COUNT, max_shared: float = DEFAULT_MAX_SHARED,
          index: str | Path | None = None, eval_windows: int = 16, seed: int = 0,
          overlay: bool = False, fallback: bool = False) -> dict[str, Any]:
    """Fine-tune only the rows the texts own (all they address with `force`) on the texts'
    next-token loss, everything else frozen, and save the model as a new run (or, with
    `overlay`, only the changed rows as an overlay folder). Refused: rows the training made
    non-finite; a corrupt newest checkpoint unless `fallback`."""
    run, out = Path(run), Path(out)
    if steps < 1:
        raise EditError(f"steps must be >= 1, got {steps}")
    check_output(out, sources=[run], what="overlay" if overlay else "edited run")
    model, run_json, ckpt = open_run(run, fallback)
    data, texts = run_data(run, run_json), _texts(texts)
    rows, ids = rows_for_texts(model, data, load_index(run, run_json, model, index), texts, max_count, max_shared,
                               inputs_only=True)
    chosen, left = split_rows(rows, force)
    if not chosen:
        raise EditError(f"none of the text's {len(rows)} rows is its own to train; pass --force to train them anyway")
    seq_len = run_json.get("train", {}).get("seq_len", model.config.max_seq_len)
    before = _measure(model, data, ids, seq_len, eval_windows)
    log = train_rows(model, ids, chosen, steps=steps, lr=lr, seed=seed, decode=decoder(data, model),
                     skipped=left, detail={"force": force})
    bad = sum(int((~torch.isfinite(values)).any(-1).sum()) for _, values in log.values.values())
    if bad:
        raise EditError(f"the write made {bad} of its {len(log.changed)} rows non-finite (lr {lr} is too high for "
                        "these rows); nothing was written: lower --lr or --steps")
    after = _measure(model, data, ids, seq_len, eval_windows)
    summary = {"texts": texts, "steps": steps, "lr": lr, "max_count": max_count, "max_shared": max_shared,
               "before": before, "after": after}
    saved = _save(out, run, run_json, ckpt, model, log, summary, overlay)
    return {"out": str(out), "checkpoint": str(ckpt), "changed": len(log.changed), "skipped": len(log.skipped),
            **summary, "log": log.to_dict(), **saved}


def replay(edited: str | Path, on: str | Path | None = None) -> dict[str, Any]:
    """Apply an edited run's edit log to its parent (or `on`) and check the result equals the
    edited run's tables bit for bit."""
    edited = Path(edited)
    child, child_json, child_ckpt = open_run(edited)
    if not (child_ckpt / EDIT_LOG).is_file():
        raise EditError(f"{edited} is not an edited run (its checkpoint has no {EDIT_LOG})")
    parent = Path(on) if on else Path(child_json["parent"]["run"])
    model, _, _ = open_run(parent)
    log = json.loads((child_ckpt / EDIT_LOG).read_text())
    try:
        n = replay_log(_tables(model), log, read_safetensors(child_ckpt / EDIT_VALUES))
    except ValueError as e:
        raise EditError(str(e)) from None
    mine, theirs = model.state_dict(), child.state_dict()
    differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
    if differ:
        raise EditError(f"replaying {edited}'s log on {parent} does not reproduce it: {differ[:3]} differ")
    return {"edited": str(edited), "parent": str(parent), "rows": n, "identical": True}


__all__ = ["EditError", "RowIndexError", "index_run", "locate", "forget", "write", "replay", "open_run", "text_loss"]
