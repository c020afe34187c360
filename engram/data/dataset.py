"""A prepared dataset folder: corpus + tokenizer + token files, built once and reused.

    DIR/train.jsonl, val.jsonl, corpus.json     documents (engram.data.corpora.build_corpus)
    DIR/tokenizer.json                          trained here, or a copy of the one given
    DIR/train.bin, val.bin, tokens.json         token ids (numpy memmaps) and their counts
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpora import build_corpus, read_documents
from .sources import CorpusError
from .long_context import build_long_context
from .synthetic_bios import build_synthetic_bios
from .tokenizer import TokenStream, encode_documents, load_tokenizer, special_ids, train_tokenizer


def prepare_dataset(out_dir: str | os.PathLike, *, corpus: str | None = None, inputs: list | None = None,
                    tokenizer: str | os.PathLike | None = None, vocab_size: int = 8192, seed: int = 0,
                    val_fraction: float = 0.05, people: int | None = None, examples: int | None = None,
                    log=print) -> Path:
    """Build the corpus, the tokenizer (trained on the training split unless given) and the
    token files in `out_dir`. Returns the folder. Generated corpora take their size: `people`
    for synthetic-bios, `examples` for long-context (their validation splits are made by the
    generator, so `val_fraction` does not apply)."""
    out = Path(out_dir)
    sizes = {"people": people, "examples": examples}
    given = {k for k, v in sizes.items() if v is not None}
    if corpus in GENERATED:
        size, build = GENERATED[corpus]
        others = sorted(given - {size})
        if sizes[size] is None or others:
            also = f" (not --{', --'.join(others)})" if others else ""
            raise CorpusError(f"the {corpus} corpus needs --{size} N{also}")
        info = build(out, **{size: sizes[size]}, seed=seed)
    elif given:
        raise CorpusError(f"--{', --'.join(sorted(given))} sizes a generated corpus ({', '.join(GENERATED)}), "
                          f"not {corpus or 'this corpus'}")
    else:
        info = build_corpus(out, corpus=corpus, inputs=inputs, val_fraction=val_fraction, seed=seed, log=log)
    log(f"corpus: {info.get('source', corpus or 'files')}: " + ", ".join(
        f"{split} {info[split]['documents']:,} documents" for split in ("train", "val") if split in info))
    train_docs = read_documents(out, "train")
    if tokenizer is None:
        tok = train_tokenizer(train_docs, vocab_size=vocab_size)
        tok.save(str(out / "tokenizer.json"))
        log(f"tokenizer: byte-level BPE, {tok.get_vocab_size():,} ids, trained on the training split")
    else:
        src = Path(tokenizer)
        src = src / "tokenizer.json" if src.is_dir() else src
        tok = load_tokenizer(src)
        shutil.copyfile(src, out / "tokenizer.json")
        log(f"tokenizer: {src} ({tok.get_vocab_size():,} ids)")
    eos = special_ids(tok)["eos"]
    if eos is None:
        raise CorpusError("the tokenizer has no end-of-sequence token to separate documents; add one")
    counts = {split: encode_documents(tok, read_documents(out, split), out / f"{split}.bin", eos_id=eos)
              for split in ("train", "val")}
    (out / "tokens.json").write_text(json.dumps(counts, indent=1))
    log("tokens: " + ", ".join(f"{k} {v['tokens']:,}" for k, v in counts.items()))
    return out


# generated corpora: name -> (the size option, the builder)
GENERATED = {"synthetic-bios": ("people", build_synthetic_bios), "long-context": ("examples", build_long_context)}


@dataclass
class PreparedData:
    """An opened prepared dataset."""

    root: Path
    tokenizer: Any
    train: TokenStream
    val: TokenStream
    counts: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, root: str | os.PathLike) -> "PreparedData":
        root = Path(root)
        needed = ["tokenizer.json", "train.bin", "val.bin", "tokens.json"]
        missing = [n for n in needed if not (root / n).is_file()]
        if missing:
            raise CorpusError(f"{root} is not a prepared dataset (missing {', '.join(missing)}); "
                              f"build it with: engram data build --out {root}")
        counts = json.loads((root / "tokens.json").read_text())
        return cls(root=root, tokenizer=load_tokenizer(root / "tokenizer.json"),
                   train=TokenStream(root / "train.bin", counts["train"]["dtype"]),
                   val=TokenStream(root / "val.bin", counts["val"]["dtype"]), counts=counts)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data a run trained on, cheap to recompute: the tokenizer's sha256,
        the token files' counts and sizes, and the documents' sha256 from corpus.json (when the
        folder has one). A run resumed on other data is refused on this."""
        corpus = self.root / "corpus.json"
        docs = json.loads(corpus.read_text()) if corpus.is_file() else {}
        splits = {split: {**self.counts[split], "file_bytes": (self.root / f"{split}.bin").stat().st_size,
                          "documents_sha256": docs.get(split, {}).get("sha256")} for split in ("train", "val")}
        return {"tokenizer_sha256": hashlib.sha256((self.root / "tokenizer.json").read_bytes()).hexdigest(), **splits}

    def bytes_per_token(self, split: str = "val") -> float:
        c = self.counts[split]
        return c["bytes"] / c["tokens"]
