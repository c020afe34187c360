"""Gate heatmaps of any text: how strongly each Engram layer and stream lets its memory in.

    res = gate_values(model, tokenizer, "Alexander the Great was ...")
    gate_heatmap_html(res, "gates.html")   # the text, each token's background = its gate
    gate_heatmap_png(res, "gates.png")     # rows (layer, stream) x columns (tokens)

The gates come from the model's own forward (`return_intermediates=True`); nothing is edited.
Like the paper's figure, gates near 1 mark tokens where the N-gram memory is trusted (the end
of multi-token entities and set phrases: "Alexander the Great", "By the way").
"""

from __future__ import annotations

import html
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

COLOUR = (214, 39, 40)  # a gate of 1; a gate of 0 is white


def _token_texts(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """Each token's piece of `text`, from its start offset to the next token's start.

    Byte-level BPE can split one character over two tokens whose offsets overlap; cutting at
    the start offsets gives the first piece "" and the second the character, so the pieces
    always join back to the text exactly (the first token also takes any leading text)."""
    starts, last = [], 0
    for i, (s, _) in enumerate(offsets):
        last = 0 if i == 0 else max(last, min(int(s), len(text)))
        starts.append(last)
    ends = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, ends)]


@torch.no_grad()
def gate_values(model: Any, tokenizer: Any, text: str) -> dict[str, Any]:
    """Per-token gates of every Engram layer for `text` (no special tokens added).

    Returns {"text", "tokens": [str] (slices of the text, joining back to it), "ids": [int],
    "gates": {layer: float numpy [T, M]}} (M = hyper-connection streams)."""
    if not model.engram_layers:
        raise ValueError("the model has no Engram layers, so there are no gates to show")
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = list(enc.ids)
    if not ids:
        raise ValueError("the text is empty after tokenization; give some text to show the gates of")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        out = model(torch.tensor([ids], dtype=torch.long, device=device), return_intermediates=True)
    finally:
        model.train(was_training)
    gates = {int(layer): g[0].float().cpu().numpy() for layer, g in out.intermediates["gates"].items()}
    return {"text": text, "tokens": _token_texts(text, list(enc.offsets)), "ids": ids, "gates": gates}


def _rows(result: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """One (label, [T] gates) per (layer, stream), layers in order."""
    rows = []
    for layer in sorted(result["gates"]):
        g = np.asarray(result["gates"][layer])
        for m in range(g.shape[1]):
            rows.append((f"layer {layer}, stream {m}", g[:, m]))
    return rows


def _colour(g: float) -> str:
    g = float(np.clip(g, 0.0, 1.0))
    r, gr, b = (round(255 + (c - 255) * g) for c in COLOUR)
    return f"rgb({r},{gr},{b})"


def gate_heatmap_html(result: dict[str, Any], path: str | os.PathLike, title: str = "Engram gates") -> Path:
    """A self-contained HTML page: for each (layer, stream) the text with each token's background
    coloured by its gate (0 white -> 1 red); hovering a token shows its value."""
    esc = html.escape
    parts = [
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{esc(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        ".line{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:.4em}"
        ".tok{padding:.15em 0}.legend span{display:inline-block;width:2.5em;text-align:center;"
        "font-size:80%}h2{font-size:100%;margin-bottom:.2em}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<div class="legend">gate: ' + "".join(
            f'<span style="background:{_colour(v)}">{v:.1f}</span>' for v in np.linspace(0, 1, 6)) + "</div>",
    ]
    for label, g in _rows(result):
        spans = "".join(
            f'<span class="tok" style="background:{_colour(v)}" title="{esc(repr(tok), quote=True)}: {v:.3f}">'
            f"{esc(tok)}</span>" for tok, v in zip(result["tokens"], g))
        parts += [f"<h2>{esc(label)}</h2>", f'<div class="line">{spans}</div>']
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _tick(tok: str) -> str:
    """A readable tick label: newlines and tabs escaped, a blank token as ␣, the leading
    bytes of a character split over tokens (an empty slice) as ·."""
    if not tok:
        return "\u00b7"
    shown = tok.replace("\n", "\\n").replace("\t", "\\t")
    return shown if shown.strip() else shown.replace(" ", "\u2423")


def gate_heatmap_png(result: dict[str, Any], path: str | os.PathLike, title: str = "Engram gates") -> Path:
    """A heatmap: rows (layer, stream), columns tokens (labelled with their text), colours 0..1."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(result)
    tokens = result["tokens"]
    grid = np.stack([g for _, g in rows])  # [rows, T]
    fig = Figure(figsize=(max(6.0, 0.32 * len(tokens) + 2.5), max(2.2, 0.45 * len(rows) + 1.8)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xticks(range(len(tokens)), [_tick(t) for t in tokens], rotation=90, fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="gate")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # characters the default font lacks (CJK) draw as boxes
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return path


def plot_gates(model: Any, tokenizer: Any, text: str, out_dir: str | os.PathLike,
               name: str = "gates") -> dict[str, Path]:
    """gate_values + the HTML page, the PNG and the values as JSON in `out_dir`; returns the paths."""
    result = gate_values(model, tokenizer, text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = {"text": text, "tokens": result["tokens"], "ids": result["ids"],
              "gates": {str(k): v.tolist() for k, v in result["gates"].items()}}
    (out / f"{name}.json").write_text(json.dumps(values, ensure_ascii=False), encoding="utf-8")
    return {"html": gate_heatmap_html(result, out / f"{name}.html"),
            "png": gate_heatmap_png(result, out / f"{name}.png"), "json": out / f"{name}.json"}
