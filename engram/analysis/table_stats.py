"""What the Engram tables hold on a corpus: rows touched, row usage, collisions, row norms.

    stats = table_statistics(model, batches)      # {layer: {...}}, batches of [B, T] token ids
    plot_table_stats(stats, "docs/results/")       # Zipf plot and row-norm histogram

Rows come from the model's own hasher (`model.hasher.hash(model.compress(ids))`), exactly as
the forward computes them; no forward runs and nothing is edited.

Per Engram layer, head h (order n = 2 + h // K, K heads per order):
- `rows_touched[h]`: distinct rows read / table size; `rows_touched_overall`: distinct flat
  rows read / all rows of the layer.
- `usage`: int64 [sum(table_sizes)], how many positions read each flat row (head h's rows
  start at `offsets[h]`), for a Zipf plot.
- `collision_rate[h]`: among the distinct n-grams of order n in the corpus, the fraction whose
  row in head h is also the row of at least one other distinct n-gram. An n-gram is the tuple
  (x'_{t-n+1}, ..., x'_t) of compressed ids, with positions before the start reading pad_id
  (the tuple the hash sees). `expected_collision_rate[h]` = 1 - (1 - 1/p)^(U-1), the rate a
  uniform random hash into p rows would give U distinct n-grams.
- `row_norms`: float32 [sum(table_sizes)] L2 norm of every row (None when the table keeps
  no `weight` tensor, e.g. a disk table); touched rows are `usage > 0`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

_NORM_CHUNK_ROWS = 1 << 16


def _ngram_tuples(cids_BT: torch.Tensor, pad_id: int, n: int) -> np.ndarray:
    """[B*T, n] compressed-id tuples (x_{t-n+1} .. x_t), pad before the start."""
    B, T = cids_BT.shape
    ctx = torch.cat([torch.full((B, n - 1), pad_id, dtype=torch.int64), cids_BT], dim=1)
    return torch.stack([ctx[:, i:i + T] for i in range(n)], dim=-1).reshape(-1, n).numpy()


@torch.no_grad()
def _row_norms(table: Any) -> np.ndarray | None:
    weight = getattr(table, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.is_meta:
        return None
    return np.concatenate([
        torch.linalg.vector_norm(weight[i:i + _NORM_CHUNK_ROWS].detach().double(), dim=1).float().cpu().numpy()
        for i in range(0, weight.shape[0], _NORM_CHUNK_ROWS)])


@torch.no_grad()
def table_statistics(model: Any, ids_batches: Iterable[torch.Tensor]) -> dict[int, dict[str, Any]]:
    """Statistics of every Engram layer over `ids_batches` (original token ids, [B, T] each,
    every position real). Returns {layer: dict} with the fields in the module docstring."""
    hasher = getattr(model, "hasher", None)
    if hasher is None:
        raise ValueError("the model has no Engram layers, so there are no tables to describe")
    layout = hasher.layout
    N, K, pad = layout.max_ngram_size, layout.n_head_per_ngram, layout.pad_id
    sizes = {l: np.asarray(hasher.table_sizes[l], dtype=np.int64) for l in hasher.layer_ids}
    offsets = {l: np.concatenate([[0], np.cumsum(s)[:-1]]) for l, s in sizes.items()}
    usage = {l: np.zeros(int(s.sum()), dtype=np.int64) for l, s in sizes.items()}
    # per layer and order: distinct rows of [n-gram tuple | its K rows]
    seen: dict[int, dict[int, list[np.ndarray]]] = {l: {n: [] for n in range(2, N + 1)} for l in sizes}
    tokens = 0
    device = model.compression.device
    for ids in ids_batches:
        ids = torch.as_tensor(ids)
        if ids.dim() != 2:
            raise ValueError(f"each batch must be [batch, time] token ids, got shape {tuple(ids.shape)}")
        cids = model.compress(ids.to(device))
        rows = hasher.hash(cids)
        cids = cids.cpu()
        tokens += ids.numel()
        for layer, rows_BTH in rows.items():
            r_PH = rows_BTH.reshape(-1, rows_BTH.shape[-1]).cpu().numpy().astype(np.int64)
            usage[layer] += np.bincount((r_PH + offsets[layer]).ravel(), minlength=usage[layer].size)
            for n in range(2, N + 1):
                keyed = np.concatenate([_ngram_tuples(cids, pad, n), r_PH[:, (n - 2) * K:(n - 1) * K]], axis=1)
                found = seen[layer][n]
                found.append(np.unique(keyed, axis=0))
                if len(found) >= 8:  # merge now and then: memory ~ distinct n-grams, not tokens
                    seen[layer][n] = [np.unique(np.concatenate(found), axis=0)]
    if tokens == 0:
        raise ValueError("ids_batches held no tokens")
    out: dict[int, dict[str, Any]] = {}
    for layer, size_H in sizes.items():
        u = usage[layer]
        touched, distinct, collision, expected = [], [], [], []
        for h, p in enumerate(size_H):
            n = 2 + h // K
            touched.append(float((u[offsets[layer][h]:offsets[layer][h] + p] > 0).sum() / p))
            if len(seen[layer][n]) > 1:
                seen[layer][n] = [np.unique(np.concatenate(seen[layer][n]), axis=0)]
            rows_U = seen[layer][n][0][:, n + h % K]  # one row per distinct n-gram
            _, inverse, counts = np.unique(rows_U, return_inverse=True, return_counts=True)
            distinct.append(int(rows_U.size))
            collision.append(float((counts[inverse] > 1).mean()))
            expected.append(float(1.0 - (1.0 - 1.0 / p) ** (rows_U.size - 1)))
        out[layer] = {
            "table_sizes": size_H.tolist(), "offsets": offsets[layer].tolist(),
            "orders": [2 + h // K for h in range(len(size_H))], "tokens": tokens,
            "rows_touched": touched, "rows_touched_overall": float((u > 0).sum() / u.size),
            "distinct_ngrams": distinct, "collision_rate": collision, "expected_collision_rate": expected,
            "usage": u, "row_norms": _row_norms(model.blocks[layer].engram.table),
        }
    return out


def training_row_reads(model: Any, stream: Any, *, steps: int, batch_size: int, seq_len: int, seed: int
                       ) -> dict[int, dict[str, Any]]:
    """How many times training read the average used row: the run's own batches replayed
    (`stream.batch(step, ...)` for every step, as the loop draws them), hashed, and counted per
    flat row. Per layer: reads (positions x heads), used rows, reads per used row, table rows."""
    if getattr(model, "hasher", None) is None:
        raise ValueError("the model has no Engram layers, so there are no rows to count")
    head_sizes = {l: list(model.blocks[l].engram.table.table_sizes) for l in model.hasher.layer_ids}
    sizes = {l: int(sum(h)) for l, h in head_sizes.items()}
    offsets = {l: torch.tensor(np.concatenate([[0], np.cumsum(h)[:-1]])) for l, h in head_sizes.items()}
    counts = {l: torch.zeros(n, dtype=torch.int64) for l, n in sizes.items()}
    device = model.compression.device
    for step in range(steps):
        ids = stream.batch(step, batch_size, seq_len, seed)[:, :-1]
        for layer, rows_BTH in model.engram_rows(ids.to(device)).items():  # capacity 1 reads row 0
            counts[layer] += torch.bincount((rows_BTH.cpu() + offsets[layer]).flatten(), minlength=sizes[layer])
    out = {}
    for layer, c in counts.items():
        used = int((c > 0).sum())
        out[layer] = {"reads": int(c.sum()), "used_rows": used, "table_rows": sizes[layer],
                      "reads_per_used_row": float(c.sum()) / max(used, 1)}
    return out


def summarize(stats: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The JSON-friendly part of `table_statistics` (arrays replaced by a few numbers)."""
    out = {}
    for layer, s in stats.items():
        d = {k: v for k, v in s.items() if not isinstance(v, np.ndarray) and v is not None}
        touched = s["usage"] > 0
        if s["row_norms"] is not None:
            for name, mask in (("touched", touched), ("untouched", ~touched)):
                norms = s["row_norms"][mask]
                d[f"row_norm_mean_{name}"] = float(norms.mean()) if norms.size else None
        out[str(layer)] = d
    return out


def plot_table_stats(stats: dict[int, dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Writes `table_zipf.png` (rank vs reads of touched rows, log-log, per layer and order)
    and `table_row_norms.png` (row-norm histograms, touched vs untouched, one panel per
    layer; only when row norms are known). Returns the paths written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for layer, s in stats.items():
        for n in sorted(set(s["orders"])):
            parts = [s["usage"][o:o + p] for o, p, m in zip(s["offsets"], s["table_sizes"], s["orders"]) if m == n]
            counts = np.sort(np.concatenate(parts))[::-1]
            counts = counts[counts > 0]
            ax.loglog(np.arange(1, counts.size + 1), counts, label=f"layer {layer}, {n}-grams")
    ax.set_xlabel("row rank")
    ax.set_ylabel("reads")
    ax.set_title("Engram row usage (Zipf)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out_dir / "table_zipf.png"]
    fig.savefig(paths[0], dpi=120)

    layers = [l for l, s in stats.items() if s["row_norms"] is not None]
    if layers:
        fig = Figure(figsize=(5 * len(layers), 4))
        FigureCanvasAgg(fig)
        for ax, layer in zip(np.atleast_1d(fig.subplots(1, len(layers))), layers):
            norms, touched = stats[layer]["row_norms"], stats[layer]["usage"] > 0
            bins = np.histogram_bin_edges(norms, bins=60)
            for name, mask in (("touched", touched), ("untouched", ~touched)):
                if mask.any():
                    ax.hist(norms[mask], bins=bins, density=True, alpha=0.55, label=f"{name} ({int(mask.sum())})")
            ax.set_xlabel("row L2 norm")
            ax.set_ylabel("density")
            ax.set_title(f"layer {layer}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out_dir / "table_row_norms.png")
        fig.savefig(paths[-1], dpi=120)
    return paths
