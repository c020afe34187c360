"""CompressedTokenizer: the surjective map P: V -> V' that merges ids with the same surface.

Tokens that differ only in case, accents, Unicode form or surrounding whitespace ("Apple",
" apple", "APPLE") carry the same n-gram meaning; merging them before hashing makes the
tables denser (docs/paper.md step 1: about 23% fewer ids on DeepSeek-V3's 128k vocabulary).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .layout import vocab_fingerprint

_SENTINEL = "\ue000"  # private-use char: protects a text that is exactly one space from Strip
_REPLACEMENT_CHAR = "\ufffd"


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def _token_accessors(tok: Any) -> tuple[int, Callable[[int], str], Callable[[int], str]]:
    """(vocab size incl. added tokens, decode one id, raw token string) for any tokenizer kind."""
    from tokenizers import Tokenizer

    if isinstance(tok, (str, os.PathLike)):
        path = Path(tok)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}; pass a tokenizer.json file or its folder")
        tok = Tokenizer.from_file(str(path))
    if isinstance(tok, Tokenizer):
        return (
            tok.get_vocab_size(with_added_tokens=True),
            lambda i: tok.decode([i], skip_special_tokens=False),
            lambda i: tok.id_to_token(i) or "",
        )
    if all(hasattr(tok, a) for a in ("decode", "convert_ids_to_tokens", "__len__")):
        # A transformers tokenizer: decode exactly as it decodes (including its clean-up setting).
        return (
            len(tok),
            lambda i: tok.decode([i], skip_special_tokens=False),
            lambda i: tok.convert_ids_to_tokens(i) or "",
        )
    raise TypeError(
        f"cannot build a CompressedTokenizer from {type(tok).__name__}; pass a tokenizers.Tokenizer, "
        "a transformers tokenizer, or the path of a tokenizer.json"
    )


class CompressedTokenizer:
    """Maps original token ids to compressed ids: `lookup_table[original_id] -> compressed_id`."""

    def __init__(self, lookup_table: np.ndarray) -> None:
        table = np.asarray(lookup_table)
        if table.ndim != 1 or table.size == 0 or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"lookup_table must be a non-empty 1-D integer array, got {table.dtype} {table.shape}")
        table = table.astype(np.int64)
        n = int(table.max()) + 1
        if table.min() < 0 or len(np.unique(table)) != n:
            raise ValueError("lookup_table must map onto 0..V'-1 with every compressed id used")
        self.lookup_table = table
        self._size = n
        self._torch_tables: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "CompressedTokenizer":
        """Build the map for a tokenizers.Tokenizer, a transformers tokenizer or a tokenizer.json path.

        Each id is decoded alone and normalized (NFKC, NFD, strip accents, lowercase, collapse
        whitespace, strip; a lone space stays a space). Decodes containing U+FFFD (partial UTF-8)
        key on the raw token string; an empty normalization keys on the decoded text. Ids with
        equal keys share a compressed id, numbered by first appearance.
        """
        vocab_size, decode, raw_token = _token_accessors(tokenizer)
        normalize = _normalizer().normalize_str
        key_to_new: dict[str, int] = {}
        table = np.empty(vocab_size, dtype=np.int64)
        for tid in range(vocab_size):
            text = decode(tid)
            if _REPLACEMENT_CHAR in text:
                key = raw_token(tid)
            else:
                key = normalize(text) or text
            table[tid] = key_to_new.setdefault(key, len(key_to_new))
        return cls(table)

    def __len__(self) -> int:
        """V': the compressed vocabulary size."""
        return self._size

    @property
    def original_vocab_size(self) -> int:
        return len(self.lookup_table)

    @property
    def fingerprint(self) -> str:
        """sha256 of the table; saved in the hash layout to catch a swapped tokenizer."""
        return vocab_fingerprint(self.lookup_table)

    def __call__(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Compress ids of any shape; returns the same kind (torch on the same device, or numpy)."""
        is_torch = isinstance(ids, torch.Tensor)
        arr = ids if is_torch else np.asarray(ids)
        if is_torch:
            not_int = arr.dtype.is_floating_point or arr.dtype.is_complex or arr.dtype == torch.bool
        else:
            not_int = not np.issubdtype(arr.dtype, np.integer)
        if not_int:
            raise TypeError(f"token ids must be integers, got {arr.dtype}")
        if arr.numel() if is_torch else arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.original_vocab_size:
                raise ValueError(
                    f"token ids must be in [0, {self.original_vocab_size}) for this tokenizer, got "
                    f"values in [{lo}, {hi}]; replace padding like -100 by the pad id before compressing"
                )
        if not is_torch:
            return self.lookup_table[arr]
        device = arr.device
        if device not in self._torch_tables:
            self._torch_tables[device] = torch.from_numpy(self.lookup_table).to(device)
        return self._torch_tables[device][arr.long()]

    def __repr__(self) -> str:
        v, n = self.original_vocab_size, len(self)
        return f"CompressedTokenizer({v} -> {n} ids, {100 * (1 - n / v):.2f}% fewer)"
