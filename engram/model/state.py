"""DecodeState: everything a forward needs to continue a batch of sequences exactly.

Attention needs the keys and values of every earlier position; Engram needs the last N-1
compressed ids (its n-grams reach back) and the short conv's input history. Losing either
after the prompt is the classic bug of cached Engram decoding; keeping them here makes any
split of a sequence into chunks give the full forward's logits.

Every tensor is allocated once, at its final shape, and updated in place (`index_copy_`,
`copy_`, `add_`): the state is static in shape, so one compiled decode step (and one CUDA
graph) serves every token, and nothing is concatenated per token.

The state owns its bookkeeping; a forward calls `begin_chunk` (cache columns, capacity,
positions, the attention mask), `hash_chunk` (row ids from the stored n-gram history) and,
after the blocks, `end_chunk`. The blocks update the KV caches and the conv histories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..memory.engram import ShortConvState
from .attention import KVCache

if TYPE_CHECKING:
    from ..hashing.ngram import NgramHasher


def token_positions(valid_BS: torch.Tensor | None, B: int, S: int, device: torch.device,
                    next_position_B: torch.Tensor | None = None) -> torch.Tensor:
    """Positions [B, S] for RoPE: each sequence counts only its real tokens (padding takes the
    position of the token after it, clamped at 0), from `next_position_B` when continuing."""
    if valid_BS is None:
        steps_S = torch.arange(S, device=device)
        return steps_S.expand(B, S) if next_position_B is None else next_position_B.unsqueeze(1) + steps_S
    counted_BS = valid_BS.long().cumsum(1) - 1
    if next_position_B is not None:
        counted_BS = counted_BS + next_position_B.unsqueeze(1)
    return counted_BS.clamp_min(0)


def padding_mask(valid_BS: torch.Tensor | None) -> torch.Tensor | None:
    """Attention mask [B, S, S] of one whole forward of a left-padded batch: causal over real
    keys, and every query sees itself (a padded query has no other key). None: no padding,
    plain causal attention."""
    if valid_BS is None:
        return None
    S = valid_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=valid_BS.device).tril()
    self_SS = torch.eye(S, dtype=torch.bool, device=valid_BS.device)
    return (causal_SS & valid_BS.unsqueeze(1)) | self_SS


@dataclass
class DecodeState:
    """Per batch: a KV cache per block (capacity C columns), which columns hold real tokens,
    how many columns are written, the next position per sequence, the n-gram history
    [B, N-1] (compressed ids) and the short-conv state per Engram layer.

    Columns are shared by the batch: a left-padded prompt writes its padding too (marked
    False in `key_valid`), so every row writes the same column at each step."""

    kv: list[KVCache]
    key_valid: torch.Tensor  # [B, C] bool: written and not padding
    length: torch.Tensor  # [] long: columns written so far (padding included)
    next_position: torch.Tensor  # [B] long: real tokens seen so far per sequence
    ngram_history: torch.Tensor | None = None  # [B, N-1]
    conv: dict[int, ShortConvState] = field(default_factory=dict)
    # `length` as the host knows it without a sync, so an eager forward attends over the
    # written columns only; None once a compiled step ran (it reads all C columns instead).
    written: int | None = 0
    # a forward was given `valid` (the cache may hold padding): every later step needs a mask
    padded: bool = False
    # Rollback (speculative decoding): with `keep_trail` each forward keeps the n-gram history it
    # started from plus its ids (`ngram_trail`, [B, N-1+S]) and each conv state its inputs, so the
    # state can return into the last forward; `last_tokens` is that forward's S.
    keep_trail: bool = False
    ngram_trail: torch.Tensor | None = None
    last_tokens: int = 0

    @classmethod
    def allocate(
        cls, *, batch_size: int, capacity: int, kv_heads: list[tuple[int, int]],
        conv_shapes: dict[int, tuple[int, int] | None], ngram_history: torch.Tensor | None,
        dtype: torch.dtype, device: torch.device | str,
    ) -> "DecodeState":
        """An empty state: per block a KV cache of `capacity` columns ((kv heads, head dim) in
        `kv_heads`), zeroed, nothing written; per Engram layer a zero conv history
        ((context, channels), or None without a short conv); the given n-gram history."""
        B, C = batch_size, capacity
        length = torch.zeros((), dtype=torch.long, device=device)
        kv = []
        for G, E in kv_heads:
            kv.append(KVCache(torch.zeros(B, G, C, E, dtype=dtype, device=device),
                              torch.zeros(B, G, C, E, dtype=dtype, device=device), length))
        conv = {layer: ShortConvState() if shape is None else ShortConvState(
                    history=torch.zeros(B, *shape, dtype=dtype, device=device))
                for layer, shape in conv_shapes.items()}
        state = cls(kv=kv, key_valid=torch.zeros(B, C, dtype=torch.bool, device=device), length=length,
                    next_position=torch.zeros(B, dtype=torch.long, device=device),
                    ngram_history=ngram_history, conv=conv)
        if not torch.compiler.is_compiling():  # (inside a compiled forward the state is internal)
            for t in state.tensors():  # updated in place at fixed addresses: CUDA graphs need no copies
                torch._dynamo.mark_static_address(t)
        return state

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]

    @property
    def capacity(self) -> int:
        """C: the most positions (padding included) this state can hold."""
        return self.key_valid.shape[1]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the state owns (the buffers a compiled step mutates in place)."""
        out = [t for c in self.kv for t in (c.k, c.v)] + [self.key_valid, self.length, self.next_position]
        if self.ngram_history is not None:
            out.append(self.ngram_history)
        out += [s.history for s in self.conv.values() if s.history is not None]
        return out

    # ---------------------------------------------------------------- one forward: begin, hash, end
    def begin_chunk(self, batch_size: int, S: int, valid_BS: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Take the next S columns for a forward of `batch_size` sequences (checking batch and
        capacity), mark which of them hold real tokens, and point every KV cache at them.
        Returns (positions [B, S], attention mask [B, S, K] over the K key columns read, or None
        when nothing needs hiding). Static decisions only: whether a mask is needed depends on
        shapes and on whether padding was ever given, never on values."""
        if self.batch_size != batch_size:
            raise ValueError(f"state holds {self.batch_size} sequences, input_ids has {batch_size}")
        if S > self.capacity:
            raise ValueError(f"input longer than the decode state's capacity: {S} > {self.capacity} "
                             "positions; create it with new_state(batch, max_len=...) up to max_seq_len")
        start = self._claim(S)
        for cache in self.kv:
            cache.start = start
        dev = self.key_valid.device
        positions_BS = token_positions(valid_BS, batch_size, S, dev, self.next_position)

        # keys: the cache's columns; this chunk writes [length, length + S)
        if start is None:  # all C columns; the write position is a tensor
            K = self.capacity
            cols_S = self.length.view(1) if S == 1 else self.length + torch.arange(S, device=dev)
            if valid_BS is None:
                self.key_valid.index_fill_(1, cols_S, True)
            else:
                self.key_valid.index_copy_(1, cols_S, valid_BS)
        else:  # the written columns [0, start + S)
            K = start + S
            cols_S = None if S == 1 and valid_BS is None else torch.arange(start, K, device=dev)
            self.key_valid[:, start:K] = True if valid_BS is None else valid_BS
        if valid_BS is not None:
            self.padded = True
        if not (start is None or self.padded or S > 1):
            return positions_BS, None  # one query after written columns that are all real tokens
        mask_BSK = self.key_valid[:, :K].unsqueeze(1)  # [B, 1, K]: unwritten columns are False
        if S > 1:  # causal inside the chunk
            mask_BSK = mask_BSK & (torch.arange(K, device=dev) <= cols_S.unsqueeze(1))
        if valid_BS is not None:  # every query sees itself (a padded query has no other key)
            mask_BSK = mask_BSK | (torch.arange(K, device=dev) == cols_S.unsqueeze(1))
        return positions_BS, mask_BSK

    def _claim(self, S: int) -> int | None:
        """The first column this forward writes, when the host knows it (eager: attention then
        reads only the written columns); None under torch.compile or once a compiled step ran."""
        if torch.compiler.is_compiling() or self.written is None:
            # A compiled step writes at `length` (a tensor) and reads all C columns, so one
            # graph serves every step; the host no longer knows how far the cache is filled.
            # A value check without a host sync: immediate on a CPU, a device assert on a GPU.
            torch._assert_async(self.length + S <= self.capacity,
                                "input longer than the decode state's capacity (see EngramLM.check_inputs)")
            self.written = None
            return None
        start = self.written
        if start + S > self.capacity:
            raise ValueError(
                f"input longer than the decode state's capacity {self.capacity}: {start} positions "
                f"held + {S} given; create the state with new_state(batch, max_len=...) up to max_seq_len")
        self.written = start + S
        return start

    def hash_chunk(self, hasher: "NgramHasher", cids_BS: torch.Tensor) -> dict[int, torch.Tensor]:
        """Row ids {layer: [B, S, H]} of this chunk's compressed ids, its n-grams reaching back
        into the stored last N-1 ids, which then move on to this chunk's last N-1."""
        if self.keep_trail:  # what a rollback into this forward needs
            self.ngram_trail = torch.cat([self.ngram_history, cids_BS], dim=1)
        rows, history = hasher.hash_step(self.ngram_history, cids_BS, check=False)
        self.ngram_history.copy_(history)
        return rows

    def end_chunk(self, S: int, valid_BS: torch.Tensor | None) -> None:
        """After every block wrote its keys and values (and each conv its history): count the
        S columns written and each sequence's real tokens."""
        self.next_position.add_(S if valid_BS is None else valid_BS.sum(1))
        self.length.add_(S)
        self.last_tokens = S if self.keep_trail else 0  # how far `rollback` may reach back

    # ---------------------------------------------------------------- speculative decoding
    def track_rollback(self, on: bool = True) -> "DecodeState":
        """Keep what `rollback` needs from every forward from now on (costs a copy of the conv
        inputs per forward; off by default)."""
        self.keep_trail, self.last_tokens, self.ngram_trail = on, 0, None
        for conv in self.conv.values():
            conv.keep_trail, conv.trail = on, None
        return self

    def rollback(self, drop: int | torch.Tensor) -> None:
        """Forget the last `drop` tokens of each sequence (an int for all, or [B] per sequence),
        all fed by the last forward: the next forward continues as if they had never been fed.

        A drop shared by every sequence gives the columns back (the cache is truncated); a larger
        drop of one sequence leaves masked holes in its row (like padding). Positions, the n-gram
        history and the conv history return to where they were after the kept tokens."""
        if not self.keep_trail or self.last_tokens == 0:
            raise ValueError("the last forward left no trail to roll back into (or was rolled back already): "
                             "call state.track_rollback() before the forward whose tokens may be dropped")
        if self.written is None:
            raise ValueError("a state stepped by a compiled forward cannot roll back (the host does not know "
                             "its length); decode speculatively in eager mode")
        B, S = self.batch_size, self.last_tokens
        drop_B = torch.as_tensor(drop, dtype=torch.long).expand(B).cpu()
        if bool((drop_B < 0).any()) or bool((drop_B > S).any()):
            raise ValueError(f"can drop 0..{S} tokens per sequence (the last forward fed {S}), got {drop_B.tolist()}")
        end, shared = self.written, int(drop_B.min())
        dev = self.key_valid.device
        for b, n in enumerate(drop_B.tolist()):
            if n > shared:  # this sequence's extra dropped columns become holes
                self.key_valid[b, end - n:end - shared] = False
                self.padded = True
        if shared:
            self.key_valid[:, end - shared:end] = False
            self.length.sub_(shared)
            self.written = end - shared
        self.next_position.sub_(drop_B.to(dev))
        keep_B = (S - drop_B).to(dev)  # tokens kept of the last forward, per sequence
        if self.ngram_history is not None:
            idx = keep_B.view(B, 1) + torch.arange(self.ngram_history.shape[1], device=dev)
            self.ngram_history.copy_(self.ngram_trail.gather(1, idx))
        for conv in self.conv.values():
            if conv.history is not None and conv.history.shape[1] > 0:
                idx = keep_B.view(B, 1, 1) + torch.arange(conv.history.shape[1], device=dev).view(1, -1, 1)
                conv.history.copy_(conv.trail.gather(1, idx.expand(-1, -1, conv.history.shape[2])))
        self.last_tokens = 0  # one rollback per forward: the trail now lies behind the state
