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
