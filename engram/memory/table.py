"""MemoryTable: the seam between the Engram module and wherever the table rows live.

The module hands a table per-table row ids [B, T, H]; the table returns the rows
[B, T, H, E]. Every table keeps all H tables of a layer in one flat row space with per-head
offsets (one gather for all heads). The default, `InMemoryTable` (in_memory.py), is a plain
parameter; host, disk, cached, sharded or quantized tables subclass `MemoryTable` too,
implement `gather`, and give the same numbers.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import torch
from torch import nn

from .prefetch import PendingFetch, start_fetch


class MemoryTable(nn.Module):
    """Base: owns the per-head sizes and offsets, validates row ids, delegates `gather`."""

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not table_sizes or any(int(s) < 1 for s in table_sizes):
            raise ValueError(f"table_sizes must be positive, got {list(table_sizes)}")
        self.table_sizes = tuple(int(s) for s in table_sizes)
        self.embedding_dim = int(embedding_dim)
        self.num_rows = sum(self.table_sizes)
        # Not saved: derived from the hash layout, which is saved (and checked) on its own.
        self.register_buffer("offsets", torch.empty(len(self.table_sizes), dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("sizes", torch.empty(len(self.table_sizes), dtype=torch.int64, device=device),
                             persistent=False)
        self.reset_buffers()
        # Range checks cost one device sync per call on a GPU. `EngramLM` turns them off for its
        # tables (its rows come from its own hasher; rows a user passes are checked once in
        # `EngramLM.check_inputs`), which keeps the forward free of host syncs.
        self.validate_rows = True
        self._pending: PendingFetch | None = None
        self._gather_lock = threading.Lock()
        self.last_wait_s = 0.0  # how long the last forward was blocked on its rows

    # Tables whose rows live off the compute device set this: `prefetch` then fetches in the
    # background. Resident tables gather inside forward (and keep autograd).
    asynchronous = False

    _LOCKS = ("_gather_lock", "_lock")  # recreated on copy: a lock cannot be pickled or deep-copied

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pending"] = None  # a fetch in flight belongs to the original
        for name in self._LOCKS:
            if name in state:
                state[name] = None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for name in self._LOCKS:
            if name in state:
                setattr(self, name, threading.Lock())

    def reset_buffers(self) -> None:
        """Fill `offsets` (start of each head in the flat table) and `sizes` (after `to_empty`)."""
        if self.offsets.is_meta:
            return
        offsets, sizes = self._exact_buffers(self.offsets.device)
        self.offsets.copy_(offsets)
        self.sizes.copy_(sizes)

    def _exact_buffers(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(offsets, sizes) built from `table_sizes` on `device` (never copied from a meta tensor)."""
        starts = [0]
        for s in self.table_sizes[:-1]:
            starts.append(starts[-1] + s)
        return (torch.tensor(starts, dtype=torch.int64, device=device),
                torch.tensor(self.table_sizes, dtype=torch.int64, device=device))

    def follow(self, device: torch.device | str) -> None:
        """Put `offsets` and `sizes` on `device`, the compute device (where row ids live and
        where host and disk tables deliver their rows). A table built apart from its model (a
        `load_model(..., table_factory=...)` table on the CPU, a model on a GPU) follows its
        rows on the first call; a no-op once they agree."""
        device = torch.device(device)
        if self.offsets.device != device:
            self.offsets, self.sizes = self._exact_buffers(device)

    def reset_parameters(self) -> None:
        self.reset_buffers()

    def check_rows(self, rows_BTH: torch.Tensor) -> None:
        """Row ids must be integers in [0, size of their head's table); anything else would
        silently read another head's rows through the flat offsets."""
        H = len(self.table_sizes)
        if rows_BTH.dtype.is_floating_point or rows_BTH.dim() < 1 or rows_BTH.shape[-1] != H:
            raise ValueError(
                f"row ids must be an integer tensor [..., H={H}] (one id per hash table), got "
                f"{rows_BTH.dtype} of shape {tuple(rows_BTH.shape)}; pass NgramHasher.hash(ids)[layer_id]"
            )
        bad = (rows_BTH < 0) | (rows_BTH >= self.sizes)
        if bool(bad.any()):
            head = int(bad.reshape(-1, H).any(0).nonzero()[0])
            worst = rows_BTH[..., head][bad[..., head]][0]
            raise ValueError(
                f"row id {int(worst)} is out of range for hash table {head} (size "
                f"{self.table_sizes[head]}); the rows come from a different hash layout than this table"
            )

    def _flat(self, rows_BTH: torch.Tensor) -> torch.Tensor:
        self.follow(rows_BTH.device)
        if self.validate_rows:
            self.check_rows(rows_BTH)
        return rows_BTH.long() + self.offsets  # flat ids: head h starts at offsets[h]

    def _locked_gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        with self._gather_lock:  # the prefetch worker and the caller may both gather
            return self.gather(flat_ids)

    def prefetch(self, rows_BTH: torch.Tensor) -> None:
        """Start fetching the rows a coming forward will ask for (no-op for resident tables)."""
        if self.asynchronous:
            self._pending = start_fetch(self._locked_gather, self._flat(rows_BTH), self.offsets.device)

    def forward(self, rows_BTH: torch.Tensor) -> torch.Tensor:
        flat = self._flat(rows_BTH)
        if not self.asynchronous:  # resident: nothing prefetched, no worker to lock out, no wait
            return self.gather(flat)
        pending, self._pending = self._pending, None
        if pending is not None:
            out, waited = pending.wait()
            # never serve rows fetched for other ids (stale or mismatched prefetch)
            if pending.flat_ids.shape == flat.shape and torch.equal(pending.flat_ids, flat):
                self.last_wait_s = waited
                return out
        t0 = time.perf_counter()
        out = self._locked_gather(flat)
        self.last_wait_s = time.perf_counter() - t0
        return out

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        """Rows for flat ids of any shape -> [*ids.shape, E]."""
        raise NotImplementedError
