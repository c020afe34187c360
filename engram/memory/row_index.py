"""RowIndex: which n-grams of a corpus address which table rows, and how often.

Built once per run from its training split (`engram memory index RUN`), it answers the two
questions every edit of the memory needs: how often was this row read, and which other n-grams
share it (its collision partners)? Those decide whether a row belongs to one fact or to many.

Per order m (2..N) the distinct m-grams of the stream are counted (compressed ids, pad before
the start, canonicalized across the layout's reset id as the hasher sees them); each distinct
m-gram is then hashed once, standalone, for every head of order m (a head reads only its last m
ids, so this equals the in-stream rows). From that:
  - `reads[layer]`: per flat row (heads back to back), how many positions of the stream read it;
  - partners: for each head, the m-grams seen at least `min_count` times, with their row.
Rare m-grams count in `reads` but are not listed as partners: they are what a forget must be
able to remove without being blocked by noise.

Stored as `index.safetensors` + `index.json` (version, layout fingerprint, source, sha256 of
the tensors file), written atomically; `load` checks the checksum and, given the model's
layout, that the index belongs to it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors.numpy import save_file

from ..durable import read_safetensors, staged_dir
from ..hashing.layout import HashLayout
from ..hashing.ngram import NgramHasher, _reset_windows

FORMAT = "engram-row-index"
FORMAT_VERSION = 1


class RowIndexError(ValueError):
    """A row index that is missing, corrupt, or belongs to another model."""


def layout_fingerprint(layout: HashLayout) -> str:
    """sha256 of the layout's JSON: two models address rows alike iff their fingerprints agree."""
    return hashlib.sha256(json.dumps(layout.to_dict(), sort_keys=True).encode()).hexdigest()


def head_orders(layout: HashLayout) -> list[int]:
    """The n-gram order of each hash head, in head order (K heads of order 2, then of 3, ...)."""
    return [2 + h // layout.n_head_per_ngram for h in range((layout.max_ngram_size - 1) * layout.n_head_per_ngram)]


def head_offsets(layout: HashLayout, layer: int) -> np.ndarray:
    """Where each head's rows start in the layer's flat table."""
    return np.concatenate([[0], np.cumsum(layout.primes[layer])[:-1]]).astype(np.int64)


def canonical_grams(windows_TM: np.ndarray, layout: HashLayout) -> np.ndarray:
    """Ids before a reset id read as pad, as the hasher reads them (so equal rows, equal keys)."""
    if layout.reset_id is None:
        return windows_TM
    return _reset_windows(torch.from_numpy(windows_TM), (layout.reset_id, layout.pad_id)).numpy()


def gram_rows(hasher: NgramHasher, grams_UM: np.ndarray) -> dict[int, np.ndarray]:
    """{layer: rows [U, K]} of the K heads of order m = grams_UM.shape[1] for each m-gram."""
    m, K = grams_UM.shape[1], hasher.layout.n_head_per_ngram
    first = (m - 2) * K
    out = {layer: np.empty((len(grams_UM), K), dtype=np.int64) for layer in hasher.layer_ids}
    for start in range(0, len(grams_UM), 1 << 16):  # bounded memory for millions of grams
        rows = hasher.hash(torch.from_numpy(grams_UM[start:start + (1 << 16)].astype(np.int64)), check=False)
        for layer, r in rows.items():
            out[layer][start:start + (1 << 16)] = r[:, -1, first:first + K].numpy()
    return out


@dataclass
class RowIndex:
    """Reads per row and frequent n-grams per row of one hash layout over one corpus."""

    layout_sha256: str
    source: dict[str, Any]  # what was indexed (run, checkpoint, data, tokens): provenance only
    min_count: int
    orders: tuple[int, ...]  # the n-gram order of each head, in head order
    reads: dict[int, np.ndarray]  # layer -> [rows of the layer] int64
    grams: dict[int, np.ndarray]  # order m -> [U_m, m] int32: m-grams seen >= min_count times
    gram_counts: dict[int, np.ndarray]  # order m -> [U_m] int64
    gram_rows: dict[tuple[int, int], np.ndarray]  # (layer, head) -> [U_m] int64 row within the head
    _by_row: dict = field(default_factory=dict, repr=False, compare=False)  # lookups built on first use
    _counts: dict = field(default_factory=dict, repr=False, compare=False)

    # ---------------------------------------------------------------- building
    @classmethod
    def build(cls, hasher: NgramHasher, compressed_chunks: Iterable[np.ndarray], *, min_count: int = 2,
              source: dict[str, Any] | None = None, progress=None) -> "RowIndex":
        """Index a stream of compressed ids given in consecutive chunks (n-grams run across
        chunk borders, as through one long document stream)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        layout = hasher.layout
        hasher = NgramHasher.from_layout(layout, kernel="eager")  # one pass over distinct grams: no compiles
        N = layout.max_ngram_size
        windows: dict[int, list[np.ndarray]] = {m: [] for m in range(2, N + 1)}
        history = np.full(N - 1, layout.pad_id, dtype=np.int32)
        tokens = 0
        for chunk in compressed_chunks:
            chunk = np.asarray(chunk, dtype=np.int32)
            ctx = np.concatenate([history, chunk])
            for m in windows:  # window t: the m ids ending at chunk position t
                windows[m].append(np.lib.stride_tricks.sliding_window_view(ctx, m)[N - m:])
            history = ctx[-(N - 1):]
            tokens += len(chunk)
            if progress is not None:
                progress(len(chunk))
        if tokens == 0:
            raise ValueError("the corpus to index is empty")
        reads = {layer: np.zeros(sum(layout.primes[layer]), dtype=np.int64) for layer in layout.layer_ids}
        grams, gram_counts, rows_of = {}, {}, {}
        for m, parts in windows.items():
            uniq, counts = np.unique(canonical_grams(np.concatenate(parts), layout), axis=0, return_counts=True)
            rows = gram_rows(hasher, uniq)
            keep = counts >= min_count
            grams[m], gram_counts[m] = uniq[keep].astype(np.int32), counts[keep].astype(np.int64)
            for layer in layout.layer_ids:
                offsets = head_offsets(layout, layer)
                for k in range(layout.n_head_per_ngram):
                    head = (m - 2) * layout.n_head_per_ngram + k
                    reads[layer] += np.bincount(offsets[head] + rows[layer][:, k], weights=counts,
                                                minlength=len(reads[layer])).astype(np.int64)
                    rows_of[(layer, head)] = rows[layer][keep, k]
        src = {"tokens": tokens, **(source or {})}
        return cls(layout_fingerprint(layout), src, min_count, tuple(head_orders(layout)), reads, grams, gram_counts,
                   rows_of)

    # ---------------------------------------------------------------- queries
    def check_layout(self, layout: HashLayout, what: str = "this model") -> None:
        if layout_fingerprint(layout) != self.layout_sha256:
            raise RowIndexError(f"the row index was built for another hash layout than {what}'s (index of "
                                f"{self.source.get('run', '?')}); rebuild it with: engram memory index RUN")

    def partners(self, layer: int, head: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(m-grams [P, m], counts [P]) of the frequent m-grams that address `row` of `head`,
        most frequent first."""
        m = self.orders[head]
        if (layer, head) not in self._by_row:  # sorted once per head: each query is a binary search
            order = np.argsort(self.gram_rows[(layer, head)], kind="stable")
            self._by_row[(layer, head)] = (order, self.gram_rows[(layer, head)][order])
        order, sorted_rows = self._by_row[(layer, head)]
        hit = order[np.searchsorted(sorted_rows, row, "left"):np.searchsorted(sorted_rows, row, "right")]
        hit = hit[np.argsort(-self.gram_counts[m][hit], kind="stable")]
        return self.grams[m][hit], self.gram_counts[m][hit]

    def count(self, gram: Sequence[int]) -> int:
        """How often an m-gram (compressed ids) occurs in the indexed corpus; 0 when it is rarer
        than `min_count` (such grams are not listed)."""
        gram = tuple(int(x) for x in gram)
        if len(gram) not in self.grams:
            raise ValueError(f"the index holds orders {sorted(self.grams)}, not {len(gram)}")
        if len(gram) not in self._counts:
            m = len(gram)
            self._counts[m] = dict(zip(map(tuple, self.grams[m].tolist()), self.gram_counts[m].tolist()))
        return self._counts[len(gram)].get(gram, 0)

    # ---------------------------------------------------------------- disk
    def save(self, folder: str | os.PathLike) -> Path:
        """Write `index.safetensors` + `index.json` into `folder` atomically (replacing it)."""
        folder = Path(folder)
        tensors = {f"reads.{layer}": r for layer, r in self.reads.items()}
        tensors |= {f"grams.{m}": g for m, g in self.grams.items()}
        tensors |= {f"gram_counts.{m}": c for m, c in self.gram_counts.items()}
        tensors |= {f"gram_rows.{layer}.{head}": r for (layer, head), r in self.gram_rows.items()}
        with staged_dir(folder) as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "index.safetensors"))
            digest = hashlib.sha256((tmp / "index.safetensors").read_bytes()).hexdigest()
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout_sha256": self.layout_sha256,
                    "min_count": self.min_count, "orders": list(self.orders), "source": self.source,
                    "tensors_sha256": digest}
            (tmp / "index.json").write_text(json.dumps(meta, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, layout: HashLayout | None = None) -> "RowIndex":
        folder = Path(folder)
        fix = "rebuild it with: engram memory index RUN"
        if not (folder / "index.json").is_file() or not (folder / "index.safetensors").is_file():
            raise RowIndexError(f"{folder} holds no row index; {fix}")
        try:
            meta = json.loads((folder / "index.json").read_text())
        except json.JSONDecodeError as e:
            raise RowIndexError(f"{folder / 'index.json'} is not valid JSON ({e}); {fix}") from None
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise RowIndexError(f"{folder}: format {meta.get('format')!r} version {meta.get('format_version')!r} "
                                f"is not a row index this engram-torch reads; {fix}")
        raw = (folder / "index.safetensors").read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta["tensors_sha256"]:
            raise RowIndexError(f"{folder / 'index.safetensors'} does not match its checksum (corrupt); {fix}")
        t = read_safetensors(folder / "index.safetensors", numpy=True)
        pick = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}  # noqa: E731
        index = cls(meta["layout_sha256"], meta["source"], int(meta["min_count"]), tuple(meta["orders"]),
                    {int(k): v for k, v in pick("reads.").items()}, {int(k): v for k, v in pick("grams.").items()},
                    {int(k): v for k, v in pick("gram_counts.").items()},
                    {tuple(int(x) for x in k.split(".")): v for k, v in pick("gram_rows.").items()})
        if layout is not None:
            index.check_layout(layout)
        return index
