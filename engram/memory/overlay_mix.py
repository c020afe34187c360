"""Several named overlays over one table at once, each token reading through its own stack.

A server holds every user's overlay beside the one base table and batches their requests
together. `MixedOverlayTable` keeps all overlays' rows in one sorted key space (overlay k's
row r has key k * num_rows + r), so a token's lookup through a stack of S overlays is S
binary searches over the changed rows only, never a copy of the base. `choose` sets, before a
forward, each token's stack: [T, S] overlay indices, -1 for none, later columns winning where
two overlays change the same row (as `apply_overlays` stacks them).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from .overlay import OverlayError, check_overlay_rows, stored_dtype
from .table import MemoryTable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_overlay_names(mapping) -> dict[str, str]:
    """{name: overlay folder}, names of letters, digits and `_.-` (what a request selects by)."""
    if not isinstance(mapping, Mapping):
        raise OverlayError(f"named overlays are a mapping {{name: folder}}, got {type(mapping).__name__}")
    for name, folder in mapping.items():
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise OverlayError(f"overlay name {name!r}: use 1-64 letters, digits, '_', '.', '-'")
        if not isinstance(folder, str) or not folder:
            raise OverlayError(f"overlay {name!r}: its folder must be a path, got {folder!r}")
    return dict(mapping)


class MixedOverlayTable(MemoryTable):
    """`base` under overlays [(rows [N_k] sorted unique, values [N_k, E])], chosen per token."""

    def __init__(self, base: MemoryTable, overlays: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(base.table_sizes, base.embedding_dim, device=base.offsets.device)
        device, dtype, n = base.offsets.device, stored_dtype(base), base.num_rows
        keys, values = [torch.empty(0, dtype=torch.long)], [torch.empty(0, base.embedding_dim, dtype=dtype)]
        for k, (rows, vals) in enumerate(overlays):
            check_overlay_rows(base, rows, vals, f"overlay {k}")
            keys.append(k * n + rows.long().cpu())
            values.append(vals.detach().cpu().to(dtype))
        self.base, self.n_overlays = base, len(overlays)
        self.validate_rows, self.asynchronous = base.validate_rows, base.asynchronous
        self.register_buffer("keys", torch.cat(keys).to(device), persistent=False)
        self.register_buffer("values", torch.cat(values).to(device), persistent=False)
        self.choice: torch.Tensor | None = None

    def choose(self, choice_TS: torch.Tensor | None) -> None:
        """Each token's overlay stack for the next gathers [T, S] (-1: none); None: the base."""
        if choice_TS is not None:
            if choice_TS.dim() != 2:
                raise ValueError(f"an overlay choice is [tokens, stack], got shape {tuple(choice_TS.shape)}")
            if choice_TS.device.type == "cpu" and choice_TS.numel() and int(choice_TS.max()) >= self.n_overlays:
                # checked where it costs no device sync (a server builds its choices itself)
                raise ValueError(f"overlay index {int(choice_TS.max())} chosen; this table has {self.n_overlays}")
        self.choice = choice_TS

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        out = self.base.gather(flat_ids)
        choice = self.choice
        if choice is None or self.keys.numel() == 0 or (choice.device.type == "cpu" and not bool((choice >= 0).any())):
            return out  # nothing chosen (on an accelerator the search runs rather than sync to find out)
        T = flat_ids.shape[-2]
        if choice.shape[0] != T:
            raise ValueError(f"the overlay choice covers {choice.shape[0]} tokens; this gather has {T}")
        keys, values, last = self.keys.to(flat_ids.device), self.values.to(out.device), self.keys.numel() - 1
        for s in range(choice.shape[1]):  # later stack entries win
            k = choice[:, s].to(flat_ids.device).view(T, 1)
            key = torch.where(k >= 0, k * self.base.num_rows + flat_ids, -1)
            slot = torch.searchsorted(keys, key).clamp(max=last)
            hit = keys[slot] == key
            out = torch.where(hit.unsqueeze(-1), values[slot].to(out.dtype), out)
        return out

    def stored_dtype(self) -> torch.dtype:
        return stored_dtype(self.base)
