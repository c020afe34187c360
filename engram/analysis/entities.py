"""Gate activation on multi-token named entities against all other tokens.

    spans = find_entities(text, titles)             # character spans of known names in the text
    stats = entity_gate_stats(model, tokenizer, documents, titles)
    # {layer: {"entity_first": mean gate, "entity_middle", "entity_last", "other", and counts}}

The paper's gate figure lights up inside multi-token entities ("Alexander the Great"): once the
first token of a name is seen, the N-gram memory knows what follows. So we split tokens into
the first token of an entity, its middle tokens, its last token (where the paper's gates fire)
and all other tokens.
Entity names come from a list of titles (Wikipedia titles for the wiki corpora); only
occurrences that cover two or more tokens count.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np
import torch

CLASSES = ("entity_first", "entity_middle", "entity_last", "other")


def title_pattern(titles: Iterable[str], *, min_chars: int = 4) -> re.Pattern | None:
    """One regex for all titles, longest first, on word boundaries; titles with brackets
    ("Mercury (planet)") are cut at the bracket, short ones (< min_chars) are left out."""
    names = {re.sub(r"\s*\(.*$", "", t).strip() for t in titles}
    names = sorted((n for n in names if len(n) >= min_chars), key=lambda n: (-len(n), n))
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)")


def find_entities(text: str, pattern: re.Pattern | None) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) character spans of the titles in `text`, left to right."""
    return [] if pattern is None else [m.span() for m in pattern.finditer(text)]


def token_classes(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per token, an index into CLASSES: 0 first token of an entity, 1 middle, 2 last, 3 other.
    A token belongs to a span when its first character is inside it; spans covering a single
    token are not multi-token entities and count as other."""
    cls = np.full(len(offsets), 3, dtype=np.int64)
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    for a, b in spans:
        inside = np.nonzero((starts >= a) & (starts < b))[0]
        if len(inside) >= 2:
            cls[inside[0]] = 0
            cls[inside[1:-1]] = 1
            cls[inside[-1]] = 2
    return cls


@torch.no_grad()
def entity_gate_stats(model: Any, tokenizer: Any, documents: Iterable[str], titles: Iterable[str], *,
                      max_tokens: int | None = None) -> dict[int, dict[str, float]]:
    """Mean gate (over streams) of each token class, per Engram layer, over `documents`
    (each read from its start, up to `max_tokens`, default the model's max_seq_len)."""
    if not model.engram_layers:
        raise ValueError("the model has no Engram layers, so there are no gates to measure")
    pattern = title_pattern(titles)
    limit = max_tokens or model.config.max_seq_len
    device = next(model.parameters()).device
    k = len(CLASSES)
    sums = {layer: np.zeros(k) for layer in model.engram_layers}
    counts = np.zeros(k, dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        for text in documents:
            enc = tokenizer.encode(text, add_special_tokens=False)
            ids, offsets = list(enc.ids)[:limit], list(enc.offsets)[:limit]
            if len(ids) < 2:
                continue
            cls = token_classes(offsets, find_entities(text, pattern))
            out = model(torch.tensor([ids], device=device), return_intermediates=True)
            counts += np.bincount(cls, minlength=k)
            for layer, g in out.intermediates["gates"].items():
                per_token = g[0].float().mean(-1).cpu().numpy()  # mean over streams: [T]
                sums[int(layer)] += np.bincount(cls, weights=per_token, minlength=k)
    finally:
        model.train(was_training)
    result = {}
    for layer, s in sums.items():
        result[layer] = {name: float(s[i] / counts[i]) if counts[i] else float("nan") for i, name in enumerate(CLASSES)}
        result[layer].update({f"n_{name}": int(counts[i]) for i, name in enumerate(CLASSES)})
    return result
