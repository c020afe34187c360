"""DecodeState: everything a forward needs to continue a batch of sequences exactly.

Attention needs the keys and values of every earlier position; Engram needs the last N-1
compressed ids (its n-grams reach back) and the short conv's input history. Losing either
after the prompt is the classic bug of cached Engram decoding; keeping them here makes any
split of a sequence into chunks give the full forward's logits.

Every tensor is allocated once, at its final shape, and updated in place (`index_copy_`,
`copy_`, `add_`): the state is static in shape, so one compiled decode step (and one CUDA
graph) serves every token, and nothing is concatenated per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..memory.engram import ShortConvState
from .attention import KVCache


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
