"""Per-token history of a paged batch, kept in slots that follow vLLM's KV-cache slots.

An Engram layer needs, for the token at position p of a request, two kinds of history:
- the compressed ids at p-1 .. p-(N-1) (its n-grams);
- the short conv's normalized inputs at p - dilation, ..., p - (K-1) * dilation.

Both are functions of the request's prefix, exactly like its keys and values. So they are
stored per KV slot: each forward writes every token's compressed id and conv input at the
token's `slot_mapping` entry, and reads the history back through the request's block table.
Whatever vLLM does to a sequence then holds for the history too, because vLLM does it to
the slots:
- chunked prefill reads the earlier chunks' slots;
- a prefix-cache hit reuses blocks whose slots were written for the same prefix;
- a preempted request is recomputed into new slots;
- rejected speculative tokens' slots are written again by the tokens that replace them.

The runner's `lookback_token_ids` (prompt ids just before each request's chunk, from the
CPU token table) take precedence over stored ids, as for vLLM's own n-gram models. So the
prompt part of the n-gram history does not depend on the slots at all.

The store has two extra rows: row `num_slots` is never written, so it keeps its initial value
(pad id, zero inputs: what a position before the sequence start reads), and row `num_slots + 1`
takes the writes of padding tokens (`slot_mapping` -1), so no write needs a branch.

vLLM sizes its KV cache without knowing of these stores, which sit beside it: 8 bytes plus the
conv channels of every Engram layer per slot (about a quarter of the KV cache for
`bench_serve`'s model, measured by `benchmarks/bench_serve_memory.py`). `bind` logs their size
and turns an allocation failure into an error that says how much memory to leave free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


@dataclass
class PagedBatch:
    """Where each token of a flat batch lives: its request, its position, its slot."""

    positions: torch.Tensor  # [T] long
    request: torch.Tensor  # [T] long, the row of the block table
    chunk_start: torch.Tensor  # [T] long, the position of the request's first token in this batch
    slots: torch.Tensor  # [T] long; num_slots + 1 for padding tokens
    block_table: torch.Tensor  # [R, max_blocks]
    block_size: int
    num_slots: int
    _back: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_metadata(cls, positions: torch.Tensor, meta, block_size: int, num_slots: int) -> "PagedBatch":
        T = positions.shape[0]
        starts = meta.query_start_loc.to(torch.long)
        index = torch.arange(T, device=positions.device)
        request = torch.searchsorted(starts[1:], index, right=True)
        request = request.clamp_max(meta.block_table.shape[0] - 1)  # padding tokens past the last request
        slots = meta.slot_mapping[:T].to(torch.long)
        slots = torch.where(slots >= 0, slots, num_slots + 1)
        positions = positions.to(torch.long)
        chunk_start = positions[starts[:-1].clamp_max(max(T - 1, 0))][request]
        return cls(positions, request, chunk_start, slots, meta.block_table.to(torch.long), block_size, num_slots)

    def slots_back(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, before_start) of the positions `offset` steps back: slot `num_slots` (the
        zero row) where that position is before the sequence start. Computed once per offset
        and batch: every Engram layer reads the same positions."""
        if offset in self._back:
            return self._back[offset]
        back = self.positions - offset
        before = back < 0
        back = back.clamp_min(0)
        block = self.block_table[self.request, back // self.block_size]
        slots = block * self.block_size + back % self.block_size
        self._back[offset] = torch.where(before, self.num_slots, slots), before
        return self._back[offset]


class PagedHistory:
    """The slot-keyed stores of one model: compressed ids, and each Engram layer's conv inputs."""

    def __init__(self, depth: int, pad_id: int, conv: dict[int, tuple[int, int, int]]) -> None:
        """`depth`: N - 1 ids of n-gram history; `pad_id`: the hasher's id before a sequence
        start; `conv`: {layer: (channels, kernel, dilation)} of each short conv."""
        self.depth, self.pad_id, self.conv = depth, pad_id, conv
        self.num_slots = 0
        self.ids: torch.Tensor | None = None
        self.inputs: dict[int, torch.Tensor] = {}
        self._kv_ref: torch.Tensor | None = None

    def bytes_per_slot(self, dtype: torch.dtype) -> int:
        return 8 + sum(channels for channels, _, _ in self.conv.values()) * dtype.itemsize

    def bind(self, kv_caches: list[torch.Tensor], block_size: int, dtype: torch.dtype) -> bool:
        """Size the stores from the bound KV cache (every attention layer's; first dimension:
        blocks); False while it is unbound (vLLM's profiling run). A new KV cache (after
        profiling) starts empty stores."""
        kv_cache = kv_caches[0]
        if kv_cache.numel() == 0:
            return False
        if self._kv_ref is kv_cache:
            return True
        self.num_slots = int(kv_cache.shape[0]) * block_size
        device = kv_cache.device
        size = (self.num_slots + 2) * self.bytes_per_slot(dtype)
        kv_bytes = sum(cache.numel() * cache.element_size() for cache in kv_caches)
        share = f"{size / 2**20:.0f} MiB for {self.num_slots} KV slots, {100 * size / max(kv_bytes, 1):.0f}% of the KV cache"
        try:
            self.ids = torch.full((self.num_slots + 2,), self.pad_id, dtype=torch.long, device=device)
            self.inputs = {layer: torch.zeros(self.num_slots + 2, channels, dtype=dtype, device=device)
                           for layer, (channels, _, _) in self.conv.items()}
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"no memory for the Engram history beside vLLM's KV cache ({share}, on {device}); vLLM "
                "does not count it: leave that much free (a lower --gpu-memory-utilization, or on CPU "
                "VLLM_CPU_KVCACHE_SPACE), or cap the cache with --num-gpu-blocks-override") from e
        logger.info("Engram history: %s, beside it (vLLM's KV budget does not include it)", share)
        self._kv_ref = kv_cache
        return True

    def ngram_context(self, batch: PagedBatch, cids: torch.Tensor, lookback: torch.Tensor | None,
                      compress) -> torch.Tensor:
        """Store this batch's compressed ids, then return each token's N-1 earlier ones,
        oldest first [T, N-1] (pad before the sequence start). `lookback` [R, N-1] holds the
        prompt ids at chunk_start - 1 - j (-1: not given); given ones win over the store."""
        assert self.ids is not None
        self.ids[batch.slots] = cids
        columns = []
        for k in range(self.depth, 0, -1):  # oldest first
            slots, before = batch.slots_back(k)
            ids = self.ids[slots]
            if lookback is not None and lookback.shape[1] >= 1:
                j = batch.chunk_start - (batch.positions - k) - 1  # lookback column of that position
                usable = (j >= 0) & (j < lookback.shape[1]) & ~before
                given = lookback[batch.request, j.clamp(0, lookback.shape[1] - 1)].to(torch.long)
                usable &= given >= 0
                ids = torch.where(usable, compress(given.clamp_min(0)), ids)
            columns.append(ids)
        return torch.stack(columns, dim=1)

    def conv_taps(self, layer: int, batch: PagedBatch, inputs_TC: torch.Tensor) -> torch.Tensor:
        """Store this batch's conv inputs of `layer`, then return each token's K taps, oldest
        first [T, K, C]: the inputs at p - (K-1)*dilation, ..., p (zeros before the start)."""
        store = self.inputs[layer]
        _, kernel, dilation = self.conv[layer]
        store[batch.slots] = inputs_TC.to(store.dtype)
        taps = [store[batch.slots_back((kernel - 1 - j) * dilation)[0]].to(inputs_TC.dtype)
                for j in range(kernel - 1)]
        return torch.stack(taps + [inputs_TC], dim=1)
