"""Built corpora: documents collected, cleaned, split and sealed into a folder.

    DIR/train.jsonl, DIR/val.jsonl   one {"text": ...} per line (UTF-8), in split-hash order
    DIR/corpus.json                  source, license, seed, counts and sha256 of each split

The split is by document and a pure function of (text, seed), so it does not depend on the
order the documents were read in. Documents come from `sources` (named corpora, the user's
files) or from `en_mix`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .sources import CORPORA, CorpusError, input_documents, named_documents

DEFAULT_CORPUS = "wiki-en"
SPLITS = ("train", "val")


def _split_key(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from sha256(seed, text): the document's place in the split."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def build_corpus(out_dir: str | os.PathLike, *, corpus: str | None = None,
                 inputs: list[str | os.PathLike] | None = None, val_fraction: float = 0.05,
                 seed: int = 0, log=print) -> dict:
    """Collect, clean (strip, drop blanks, deduplicate) and split documents into `out_dir`.

    A document goes to validation when its split key (see _split_key) is below val_fraction;
    both splits get at least one document. Returns the corpus.json dict.
    """
    if corpus is not None and inputs:
        raise CorpusError("give either a corpus name or input files, not both")
    if not 0.0 < val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if inputs:
        source, license_ = [str(p) for p in inputs], "as given by the user"
        raw = input_documents(inputs)
    else:
        source = corpus or DEFAULT_CORPUS
        if source not in CORPORA:
            raise CorpusError(f"unknown corpus {source!r}; choose one of: {', '.join(CORPORA)}; the generated "
                              "corpora (synthetic-bios, long-context) are built by engram data build / prepare_dataset")
        if source == "en-mix":
            from .en_mix import en_mix_documents  # several packages and parsers: only when asked for

            raw, licenses = en_mix_documents(log)
        else:
            raw = named_documents(source)
        license_ = CORPORA[source]["license"]
    docs, seen = [], set()
    for d in raw:
        text = d["text"].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append({**d, "text": text})
    if not docs:
        raise CorpusError(f"the corpus is empty: no non-blank documents in {source}; check the inputs")
    if len(docs) < 2:
        raise CorpusError(f"the corpus has {len(docs)} non-blank distinct document(s) but needs at least 2 "
                          "(one for training, one for validation); add more text")
    keyed = sorted(((_split_key(d["text"], seed), i) for i, d in enumerate(docs)))
    cut = min(max(sum(k < val_fraction for k, _ in keyed), 1), len(keyed) - 1)
    val_docs = [docs[i] for _, i in keyed[:cut]]
    train_docs = [docs[i] for _, i in keyed[cut:]]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source == "en-mix":
        (out / "licenses").mkdir(exist_ok=True)
        for name, text in licenses.items():
            (out / "licenses" / f"{name}.txt").write_text(text, encoding="utf-8")
    info = {"source": source, "license": license_, "seed": seed, "val_fraction": val_fraction,
            "documents_read": len(raw), "documents_dropped": len(raw) - len(docs)}
    info["train"] = write_jsonl(out / "train.jsonl", train_docs)
    info["val"] = write_jsonl(out / "val.jsonl", val_docs)
    return seal_corpus(out, info)


def write_jsonl(path: Path, records: list[dict]) -> dict:
    """Write records as JSON lines to path + '.tmp' (fsynced; `seal_corpus` renames it); return
    the counts and sha256 that corpus.json keeps."""
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    with open(path.with_name(path.name + ".tmp"), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    texts = [r.get("text", "") for r in records]
    return {"file": path.name, "documents": len(records), "characters": sum(map(len, texts)),
            "bytes": sum(len(t.encode("utf-8")) for t in texts), "sha256": hashlib.sha256(data).hexdigest()}


def seal_corpus(out: Path, info: dict) -> dict:
    """Finish a corpus: write corpus.json and rename every file `write_jsonl` wrote for its splits
    and `info["extra_files"]` (generated corpora), corpus.json last (it marks a complete build)."""
    files = [info[split]["file"] for split in SPLITS] + [f["file"] for f in info.get("extra_files", {}).values()]
    (out / "corpus.json.tmp").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in files + ["corpus.json"]:
        os.replace(out / (name + ".tmp"), out / name)
    return info


def read_extra_records(corpus_dir: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """A generated corpus' extra file (`people`, `probes`, ...), checked against corpus.json."""
    root = Path(corpus_dir)
    meta = root / "corpus.json"
    info = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
    extra = info.get("extra_files", {})
    if name not in extra:
        raise CorpusError(f"{root} has no {name!r} records (corpus {info.get('source', '?')!r} has "
                          f"{sorted(extra) or 'none'}); build a generated corpus that has them, e.g. "
                          f"engram data build --corpus synthetic-bios --people N --out DIR")
    return _read_checked(root / extra[name]["file"], extra[name]["sha256"], root)


def _read_checked(path: Path, sha256: str, root: Path) -> list[dict[str, Any]]:
    """The JSON lines of `path`, refused unless they hash to the sha256 corpus.json recorded."""
    raw = path.read_bytes() if path.is_file() else b""
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise CorpusError(f"{path} is missing or does not match corpus.json (changed since the build?); "
                          f"rebuild it with: engram data build --out {root}")
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def read_documents(corpus_dir: str | os.PathLike, split: str) -> list[str]:
    """The texts of one split of a built corpus, checked against the sha256 in corpus.json."""
    return [r["text"] for r in read_records(corpus_dir, split)]


def read_records(corpus_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    """The documents of one split as stored ({"text", and "title" where the source has one}),
    checked against the sha256 in corpus.json."""
    root = Path(corpus_dir)
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    meta = root / "corpus.json"
    if not meta.is_file():
        raise CorpusError(f"{root} is not a built corpus (no corpus.json); build it with: engram data build --out {root}")
    return _read_checked(root / f"{split}.jsonl", json.loads(meta.read_text(encoding="utf-8"))[split]["sha256"], root)
