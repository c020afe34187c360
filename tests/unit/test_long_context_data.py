"""Long-context synthetic tasks: the answers follow from the context, probes cut documents before
each answer, lengths grow as asked, deterministic, clear errors."""

import re

import numpy as np
import pytest

from engram.cli.main import main
from engram.data.corpora import read_extra_records
from engram.data.sources import CorpusError
from engram.data.dataset import PreparedData
from engram.data.long_context import long_context_documents, mq_niah, probes_of, render, variable_tracking


def test_mq_niah_answers_are_the_needles_values():
    ex = mq_niah(np.random.default_rng(0), 512, needles=5, queries=3)
    needles = dict(re.findall(r"special magic numbers for (\w+) is: (\d+)\.", ex["context"]))
    assert len(needles) == 5 and len(ex["steps"]) == 3
    for question, answer in ex["steps"]:
        key = re.search(r"number for (\w+)\?", question).group(1)
        assert needles[key] == answer and re.fullmatch(r"\d{5}", answer)


def test_variable_tracking_answer_is_the_chain_in_order():
    ex = variable_tracking(np.random.default_rng(1), 256, hops=4)
    value = re.search(r"assigned the value (\d+)", ex["steps"][0][0]).group(1)
    assignments = re.findall(r"VAR (\w+) = (\w+)\.", ex["context"])
    holds, order = {value}, []
    for var, source in assignments:  # follow the assignments in the order they appear
        if source in holds:
            holds.add(var)
            order.append(var)
    assert ex["steps"][0][1] == " ".join(order) and len(order) == 4
    assert len(assignments) == 8  # and a distractor chain of the same length


def test_probes_cut_the_document_before_each_answer():
    ex = mq_niah(np.random.default_rng(2), 256, needles=3, queries=2)
    doc = render(ex)
    probes = probes_of(ex)
    for p in probes:
        assert doc.startswith(p["prompt"] + " " + p["answer"])
    assert probes[1]["prompt"].startswith(probes[0]["prompt"] + " " + probes[0]["answer"])


def test_lengths_grow_and_the_build_is_deterministic():
    train, val, probes = long_context_documents(60, seed=3)
    again = long_context_documents(60, seed=3)
    assert (train, val, probes) == again and long_context_documents(60, seed=4)[0] != train
    by_len = {}
    for d in train:
        by_len.setdefault((d["task"], d["target_tokens"]), []).append(len(d["text"]))
    for task in ("mq_niah", "variable_tracking"):
        means = [np.mean(by_len[(task, n)]) for n in (256, 512, 1024)]
        assert means[0] * 1.6 < means[1] and means[1] * 1.6 < means[2], (task, means)
    assert {p["task"] for p in probes} == {"mq_niah", "variable_tracking"}
    assert not {d["text"] for d in val} & {d["text"] for d in train}


def test_bad_requests_are_clear_errors():
    with pytest.raises(CorpusError, match="queries <= needles"):
        mq_niah(np.random.default_rng(0), 256, needles=2, queries=3)
    with pytest.raises(CorpusError, match="unknown long-context tasks"):
        long_context_documents(10, tasks=("niah_single",))
    with pytest.raises(CorpusError, match="lengths >= 64"):
        long_context_documents(10, lengths=(16,))


def test_data_build_long_context(tmp_path, capsys):
    out = tmp_path / "lc"
    assert main(["data", "build", "--corpus", "long-context", "--examples", "24", "--vocab-size", "400",
                 "--out", str(out)]) == 0
    data = PreparedData.open(out)
    probes = read_extra_records(out, "probes")
    assert probes and all(set(p) >= {"task", "prompt", "answer", "target_tokens"} for p in probes)
    lengths = [len(data.tokenizer.encode(p["prompt"]).ids) for p in probes if p["target_tokens"] == 1024]
    assert 600 < np.mean(lengths) < 1600  # about the target, measured with the corpus' own tokenizer
    assert main(["data", "build", "--corpus", "long-context", "--people", "3", "--out", str(tmp_path / "x")]) == 2
    assert "needs --examples N (not --people)" in capsys.readouterr().err
