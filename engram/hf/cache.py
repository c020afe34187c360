"""`EngramCache`: a transformers `Cache` that carries engram's `DecodeState`.

The state holds the KV cache *and* what Engram needs to continue a sequence (the last N-1
compressed ids and the short-conv history): the cache transformers passes from step to step
carries them, so cached generation, beam search and padded batches equal the full forward.

Assisted decoding (`assistant_model=`, `prompt_lookup_num_tokens=`) turns on past recording:
each forward then keeps what `DecodeState.rollback` needs to return into it, and `crop` walks
back through as many forwards as it must (an assistant model drops tokens it fed one by one).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..model.attention import KVCache
from ..model.state import DecodeState


class BatchMapped:
    """Beam search and batch edits for state that lives per sequence: a subclass says how to
    map each per-sequence tensor (`_map_batch(fn)`), the rest follows."""

    def _map_batch(self, fn) -> None:
        raise NotImplementedError

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


class EngramCache(BatchMapped, Cache):
    """`state` is None until the first forward fills it (`EngramForCausalLM` creates it)."""

    def __init__(self, state: DecodeState | None = None) -> None:
        super().__init__(layers=[])
        self.state = state
        self.record_past = False
        # per forward while recording: [tokens still held, its n-gram trail, its conv trails]
        self._forwards: list[list] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns written (left padding included), as `generate` counts its input ids."""
        if self.state is None:
            return 0
        return self.state.written if self.state.written is not None else int(self.state.length)

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1 if self.state is None else self.state.capacity

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    def _map_batch(self, fn) -> None:
        """Replace every per-sequence tensor of the state by `fn(tensor)` (its rows picked or
        repeated); the shared counters stay. Recorded forwards no longer match: dropped."""
        s = self.state
        self._forwards.clear()
        if s is None:
            return
        s.kv = [KVCache(fn(c.k), fn(c.v), s.length, c.start) for c in s.kv]
        s.key_valid, s.next_position = fn(s.key_valid), fn(s.next_position)
        if s.ngram_history is not None:
            s.ngram_history = fn(s.ngram_history)
        for conv in s.conv.values():
            if conv.history is not None:
                conv.history = fn(conv.history)

    def reset(self) -> None:
        self.state = None
        self._forwards.clear()

    # ---------------------------------------------------------------- rolling back
    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """Keep, from the next forward on, what `crop` needs to drop that forward's tokens."""
        self.record_past = True

    def before_forward(self) -> None:
        """Called by the model before each forward on this cache."""
        if self.record_past and not self.state.keep_trail:
            self.state.track_rollback()

    def after_forward(self) -> None:
        """Called by the model after each forward on this cache."""
        if self.record_past:
            s = self.state
            self._forwards.append([s.last_tokens, s.ngram_trail, {layer: c.trail for layer, c in s.conv.items()}])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (transformers' convention: a negative
        count; a positive value is the length to keep). Exact: the KV columns, positions, and
        the n-gram and conv histories return to where they were after the kept tokens."""
        if self.state is None:
            return
        drop = -tokens_to_remove if tokens_to_remove <= 0 else self.get_seq_length() - tokens_to_remove
        if drop <= 0:
            return
        held = sum(record[0] for record in self._forwards)
        if not self.record_past or drop > held:
            raise ValueError(f"EngramCache can drop only tokens fed since past recording began ({held} are held "
                             f"that way, {drop} asked); call cache.activate_past_recording() before those forwards")
        s = self.state
        while drop > 0:
            record = self._forwards[-1]
            tokens, n = record[0], min(drop, record[0])
            s.last_tokens, s.ngram_trail = tokens, record[1]
            for layer, conv in s.conv.items():
                conv.trail = record[2][layer]
            s.rollback(n)
            drop -= n
            if n == tokens:
                self._forwards.pop()
            else:
                record[0] = tokens - n
