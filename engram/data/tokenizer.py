"""Tokenizer and token files: a byte-level BPE trained here, or any tokenizer.json.

Token ids are written once as one flat numpy file per split (documents joined by eos) and read
back as a memmap, so training never re-tokenizes and never holds the corpus in memory.
`TokenStream.batch` draws windows from (seed, step) alone, so a resumed run reads exactly the
batches an uninterrupted run would have read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]  # ids 0, 1, 2 in a tokenizer trained here
# Names other tokenizers use for the same roles, ours first (DeepSeek-V3, Llama/T5, GPT-2 style).
_SPECIAL_NAMES = {
    "pad": ["<|pad|>", "<｜▁pad▁｜>", "<pad>", "[PAD]", "<|padding|>"],
    "bos": ["<|bos|>", "<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<|startoftext|>"],
    "eos": ["<|eos|>", "<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"],
}
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and our specials


class TokenizerError(ValueError):
    """A user mistake with a tokenizer or a token file: missing file, bad vocabulary size, too short."""


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192) -> Any:
    """Train a byte-level BPE (GPT-2 style: any text round-trips exactly, no unknown token).

    Deterministic: the same texts in the same order give the same tokenizer.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise TokenizerError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} "
                             f"special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Any tokenizer.json (ours, DeepSeek-V3's, ...), given as the file or the folder holding it."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"no tokenizer at {file}; pass a tokenizer.json file or a folder containing one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise TokenizerError(f"{file} is not a valid tokenizer.json ({e}); pass a file saved by HF tokenizers") from None


def special_ids(tok: Any) -> dict[str, int | None]:
    """{"pad", "bos", "eos"} -> id, by our names or common ones; None where the tokenizer has none."""
    ids = {}
    for role, names in _SPECIAL_NAMES.items():
        found = (tok.token_to_id(n) for n in names)
        ids[role] = next((i for i in found if i is not None), None)
    return ids


def token_dtype(vocab_size: int) -> str:
    """uint16 while every id fits (vocabularies up to 65,536), else uint32."""
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


def encode_documents(tok: Any, documents: Iterable[str], out_path: str | os.PathLike, *, eos_id: int,
                     batch_size: int = 2048) -> dict[str, Any]:
    """Encode documents (no added specials), each followed by eos, into one flat file of ids.

    Written to a temporary name and renamed, so a crash never leaves a short file behind.
    Returns {"tokens", "bytes" (UTF-8 bytes of the documents), "documents", "dtype"}.
    """
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if not 0 <= eos_id < vocab:
        raise TokenizerError(f"eos_id {eos_id} is outside the vocabulary (0..{vocab - 1}); pass the tokenizer's eos id")
    dtype = token_dtype(vocab)
    out = Path(out_path)
    tmp = out.with_name(out.name + ".tmp")
    counts = {"tokens": 0, "bytes": 0, "documents": 0, "dtype": dtype}

    def flush(batch: list[str]) -> None:
        encoded = tok.encode_batch(batch, add_special_tokens=False)
        flat = np.concatenate([np.asarray(e.ids + [eos_id], dtype=dtype) for e in encoded])
        f.write(flat.tobytes())
        counts["tokens"] += len(flat)
        counts["bytes"] += sum(len(d.encode("utf-8")) for d in batch)
        counts["documents"] += len(batch)

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    os.replace(tmp, out)
    return counts


class TokenStream:
    """A read-only memmap of token ids with deterministic training batches and evaluation windows."""

    def __init__(self, path: str | os.PathLike, dtype: str | np.dtype) -> None:
        self.path = Path(path)
        dtype = np.dtype(dtype)
        if not self.path.is_file():
            raise TokenizerError(f"no token file at {self.path}; build the dataset first (engram data build)")
        size = self.path.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise TokenizerError(f"{self.path} has {size} bytes, not a whole number of {dtype} ids; rebuild it")
        self.tokens = np.memmap(self.path, dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def _check(self, seq_len: int) -> None:
        if seq_len < 1 or len(self) < seq_len + 1:
            raise TokenizerError(f"{self.path} holds {len(self):,} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                                 "use a shorter seq_len or more text")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
        """[B, seq_len + 1] windows at random offsets drawn from (seed, step) alone; inputs are
        [:, :-1], targets [:, 1:]."""
        self._check(seq_len)
        rng = np.random.default_rng([seed, step])  # both must be >= 0; numpy says so if not
        starts_B = rng.integers(0, len(self) - seq_len, size=batch_size)
        index_BT = starts_B[:, None] + np.arange(seq_len + 1)  # [B, 1] + [T+1] -> [B, T+1]
        return torch.from_numpy(self.tokens[index_BT].astype(np.int64))

    def windows(self, seq_len: int, max_windows: int | None = None) -> Iterator[torch.Tensor]:
        """Consecutive [1, seq_len + 1] windows with stride seq_len: every token after the first is a
        target exactly once; the last partial window is dropped."""
        self._check(seq_len)
        count = (len(self) - 1) // seq_len
        if max_windows is not None:
            count = min(count, max_windows)
        for i in range(count):
            window = self.tokens[i * seq_len: i * seq_len + seq_len + 1]
            yield torch.from_numpy(window.astype(np.int64))[None]
