"""CachedTable: a small fast tier of hot rows in front of any MemoryTable (inference only).

docs/paper.md, "System claims": N-gram frequencies are Zipfian, so a few rows serve most lookups
and a multi-level cache (hot rows in GPU/host memory, the long tail further away) pays; the
paper proposes it but does not build it. This is that first level. `gather`:
  1. unique-ifies the requested flat ids and finds the cached ones in a sorted array of cached
     ids with `searchsorted` (no dense [num_rows] map: tables can hold billions of rows, so the
     bookkeeping is O(capacity) plus the frequency sketch);
  2. reads only the misses, through the backing table's `gather` (ids are already flat);
  3. copies rows into the requested order, so the output is bit-identical to
     `backing.gather(ids)`;
  4. admits and evicts rows (below).

Admission is TinyLFU (Einziger, Friedman & Manes, "TinyLFU: A Highly Efficient Cache Admission
Policy", 2017), which suits Zipfian traffic: a count-min sketch estimates how often every id was
requested recently (all counters halve every `sample_size` requests, so it follows drift); a
missed row takes a free slot, or enters a full cache only if it is estimated more frequent than
the least frequent cached row, which it evicts. `policy="lru"` (admit every miss, evict the
least recently used) is a baseline. Everything is vectorized over the batch: no Python loop
over rows.

Inference only: rows are copied under `no_grad`, so no gradient reaches the backing table
through the cache; after changing the backing's rows, call `clear()`. `gather` holds a lock,
so a prefetch thread and the main thread may both call it.

Shapes: N requested ids (flattened), U unique ids among them, M missed unique ids, K cached ids
(K <= C), C capacity rows, E row width, R = 4 sketch rows, W sketch width.
"""

from __future__ import annotations

import threading

import torch

from .table import MemoryTable

# Fixed odd 64-bit multipliers (golden ratio, xxHash/Murmur primes): one hash per sketch row.
_MULTIPLIERS = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93)
POLICIES = ("tinylfu", "lru")


def _row_dtype(backing: MemoryTable) -> torch.dtype:
    """The dtype of the rows `backing.gather` returns: its declared `dtype`, else its first
    floating parameter or buffer, else read one row and look."""
    if isinstance(getattr(backing, "dtype", None), torch.dtype):
        return backing.dtype
    for t in list(backing.parameters()) + list(backing.buffers()):
        if t.is_floating_point():
            return t.dtype
    return backing.gather(torch.zeros(1, dtype=torch.int64, device=backing.offsets.device)).dtype


class CachedTable(MemoryTable):
    """Up to `capacity` hot rows of `backing` in a [C, E] tensor on `device` (default: where
    the backing's `offsets` live). Give exactly one of `capacity_rows` or `capacity_bytes`
    (bytes / (E * itemsize of the backing's dtype), rounded down); capacity is capped at the
    table's row count. `sample_size` (default 10 * C requests) is TinyLFU's aging period.
    The backing is a submodule, so its parameters appear in `state_dict` under `backing.`."""

    def __init__(
        self, backing: MemoryTable, *, capacity_rows: int | None = None, capacity_bytes: int | None = None,
        device: torch.device | str | None = None, policy: str = "tinylfu", sample_size: int | None = None,
    ) -> None:
        if not isinstance(backing, MemoryTable):
            raise ValueError(f"backing must be a MemoryTable, got {type(backing).__name__}")
        if (capacity_rows is None) == (capacity_bytes is None):
            raise ValueError(f"give exactly one of capacity_rows or capacity_bytes, got "
                             f"capacity_rows={capacity_rows}, capacity_bytes={capacity_bytes}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        device = torch.device(device) if device is not None else backing.offsets.device
        super().__init__(backing.table_sizes, backing.embedding_dim, device=device)
        dtype = _row_dtype(backing)
        row_bytes = self.embedding_dim * dtype.itemsize
        if capacity_bytes is not None:
            if int(capacity_bytes) < row_bytes:
                raise ValueError(f"capacity_bytes={capacity_bytes} holds no row: one row is {row_bytes} bytes "
                                 f"(E={self.embedding_dim} x {dtype}); give at least {row_bytes}")
            capacity_rows = int(capacity_bytes) // row_bytes
        if int(capacity_rows) < 1:
            raise ValueError(f"capacity_rows must be >= 1, got {capacity_rows}")
        if sample_size is not None and int(sample_size) < 1:
            raise ValueError(f"sample_size must be >= 1 requests, got {sample_size}")
        self.backing, self.policy, self.row_bytes = backing, policy, row_bytes
        self.asynchronous = backing.asynchronous  # prefetch through the cache when the backing is slow
        self.capacity = min(int(capacity_rows), self.num_rows)
        self.sample_size = int(sample_size) if sample_size is not None else 10 * self.capacity
        # Sketch width: a power of two >= 8 * C, so a hash is the top log2(W) bits of id * a.
        log_w = max(6, (8 * self.capacity - 1).bit_length()) if policy == "tinylfu" else 0
        self._shift, self._mask = 64 - log_w, (1 << log_w) - 1
        mult = [m - (1 << 64) if m >= 1 << 63 else m for m in _MULTIPLIERS]  # as signed int64
        buf = dict(persistent=False)  # runtime state: never saved, rebuilt by traffic
        self.register_buffer("store", torch.zeros(self.capacity, self.embedding_dim, dtype=dtype, device=device), **buf)
        self.register_buffer("keys", torch.empty(0, dtype=torch.int64, device=device), **buf)  # [K] sorted ids
        self.register_buffer("slots", torch.empty(0, dtype=torch.int64, device=device), **buf)  # [K] row in store
        self.register_buffer("sketch", torch.zeros(len(mult), 1 << log_w if log_w else 0, dtype=torch.int32,
                                                   device=device), **buf)  # [R, W] count-min counters
        self.register_buffer("multipliers", torch.tensor(mult, dtype=torch.int64, device=device), **buf)
        self.register_buffer("last_used", torch.zeros(self.capacity if policy == "lru" else 0, dtype=torch.int64,
                                                      device=device), **buf)  # [C] step of last use (LRU)
        self._lock = threading.Lock()
        self._since_aging = 0  # requests since the sketch last halved
        self._step = 0  # gather calls so far (LRU clock)
        self.reset_stats()

    # --- frequency sketch (TinyLFU) ----------------------------------------------------------
    def _columns(self, ids_U: torch.Tensor) -> torch.Tensor:
        """[U] ids -> [R, U] sketch column per row: the top bits of id * odd multiplier mod 2^64."""
        return ((ids_U[None, :] * self.multipliers[:, None]) >> self._shift) & self._mask

    def _record(self, ids_U: torch.Tensor, count_U: torch.Tensor) -> None:
        cols_RU = self._columns(ids_U)
        self.sketch.scatter_add_(1, cols_RU, count_U.to(torch.int32).expand_as(cols_RU).contiguous())
        self._since_aging += int(count_U.sum())
        while self._since_aging >= self.sample_size:  # aging: halve every counter
            self.sketch.bitwise_right_shift_(1)
            self._since_aging -= self.sample_size

    def estimate(self, ids: torch.Tensor) -> torch.Tensor:
        """Estimated recent request count of each id (count-min: never an underestimate)."""
        ids_U = ids.reshape(-1).to(self.sketch.device, torch.int64)
        return self.sketch.gather(1, self._columns(ids_U)).amin(0).reshape(ids.shape)

    # --- the lookup --------------------------------------------------------------------------
    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        with self._lock, torch.no_grad():
            return self._gather(flat_ids)

    def _gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        E, dev = self.embedding_dim, self.store.device
        ids_N = flat_ids.reshape(-1).to(dev, torch.int64)  # any shape -> [N]
        uniq_U, inv_N, count_U = torch.unique(ids_N, return_inverse=True, return_counts=True)
        self._step += 1
        K = self.keys.numel()
        if K:  # 1. which unique ids are cached: binary search in the sorted cached ids
            pos_U = torch.searchsorted(self.keys, uniq_U).clamp_(max=K - 1)
            hit_U = self.keys.index_select(0, pos_U) == uniq_U
        else:
            pos_U, hit_U = uniq_U, torch.zeros_like(uniq_U, dtype=torch.bool)
        hit_idx, miss_idx = hit_U.nonzero().squeeze(1), (~hit_U).nonzero().squeeze(1)
        hit_slots = self.slots.index_select(0, pos_U.index_select(0, hit_idx))
        rows_UE = torch.empty(uniq_U.numel(), E, dtype=self.store.dtype, device=dev)
        rows_UE.index_copy_(0, hit_idx, self.store.index_select(0, hit_slots))  # index_select: ~6x [] on CPU
        miss_M = uniq_U.index_select(0, miss_idx)
        rows_ME = rows_UE[:0]
        if miss_M.numel():  # 2. only the misses go to the backing table
            rows_ME = self.backing.gather(miss_M.to(self.backing.offsets.device))
            if rows_ME.dtype != self.store.dtype or tuple(rows_ME.shape) != (miss_M.numel(), E):
                raise ValueError(f"backing.gather returned {rows_ME.dtype} {tuple(rows_ME.shape)}, expected "
                                 f"{self.store.dtype} {(miss_M.numel(), E)}; the cache needs a fixed row dtype")
            rows_ME = rows_ME.to(dev)
            rows_UE.index_copy_(0, miss_idx, rows_ME)
        hits = int(count_U[hit_idx].sum())
        self._stats["requests"] += ids_N.numel()
        self._stats["unique_requests"] += uniq_U.numel()
        self._stats["hits"] += hits
        self._stats["misses"] += ids_N.numel() - hits
        self._stats["bytes_from_backing"] += miss_M.numel() * self.row_bytes
        if self.policy == "tinylfu":
            self._record(uniq_U, count_U)
        else:
            self.last_used[hit_slots] = self._step
        self._admit(miss_M, rows_ME, count_U[miss_idx])  # 4.
        return rows_UE.index_select(0, inv_N).reshape(*flat_ids.shape, E)  # 3. [U, E] -> [N, E] -> [*ids, E]

    def _admit(self, miss_M: torch.Tensor, rows_ME: torch.Tensor, count_M: torch.Tensor) -> None:
        """Fill free slots with the best candidates, then swap candidates for victims while the
        candidate is estimated more frequent (TinyLFU) or always (LRU)."""
        M, K, dev = miss_M.numel(), self.keys.numel(), self.store.device
        if M == 0:
            return
        if self.policy == "tinylfu":
            freq_M = self.estimate(miss_M)
            order_M = torch.argsort(freq_M, descending=True, stable=True)  # most frequent first
        else:
            order_M = torch.argsort(count_M, descending=True, stable=True)  # more uses this batch first
        n_free = min(self.capacity - K, M)
        k = min(M - n_free, K)  # candidates left for a full cache, each against one victim
        victims = self.keys[:0]
        if k:
            if self.policy == "tinylfu":
                vict_freq_k, vict_k = torch.topk(self.estimate(self.keys), k, largest=False)  # ascending
                # Candidates descend and victims ascend in frequency, so the winning pairs are a prefix.
                m = int((freq_M[order_M[n_free:n_free + k]] > vict_freq_k).sum())
            else:
                _, vict_k = torch.topk(self.last_used[self.slots], k, largest=False)  # oldest first
                m = k
            victims = vict_k[:m]
        new_M = order_M[:n_free + victims.numel()]
        if new_M.numel() == 0:
            return
        new_slots = torch.cat([torch.arange(K, K + n_free, device=dev), self.slots[victims]])
        self.store.index_copy_(0, new_slots, rows_ME.index_select(0, new_M))
        keep_K = torch.ones(K, dtype=torch.bool, device=dev)
        keep_K[victims] = False
        keys, order = torch.cat([self.keys[keep_K], miss_M[new_M]]).sort()  # stays sorted for searchsorted
        self.keys, self.slots = keys, torch.cat([self.slots[keep_K], new_slots])[order]
        if self.policy == "lru":
            self.last_used[new_slots] = self._step
        self._stats["evictions"] += victims.numel()

    # --- bookkeeping -------------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every cached row (call after the backing's rows change); keeps the sketch."""
        with self._lock:
            self.keys, self.slots = self.keys[:0], self.slots[:0]

    def stats(self) -> dict:
        """Counts since `reset_stats`. Requests count every requested id, duplicates included; a
        request hits when its id was cached when `gather` was called. `bytes_from_backing`
        counts rows read from the backing (each missed unique id once per call)."""
        with self._lock:
            s = dict(self._stats)
            s["hit_rate"] = s["hits"] / s["requests"] if s["requests"] else 0.0
            s["size"] = self.keys.numel()
        return s

    def reset_stats(self) -> None:
        self._stats = dict(requests=0, unique_requests=0, hits=0, misses=0, bytes_from_backing=0, evictions=0)

    def extra_repr(self) -> str:
        return (f"capacity={self.capacity}, policy={self.policy}, dim={self.embedding_dim}, "
                f"dtype={self.store.dtype}, device={self.store.device}")
