"""engram.analysis.knowledge and .entities: fact probes and gates on named entities."""

import math

import numpy as np
import pytest
import torch

from engram import EngramLM
from engram.analysis.entities import entity_gate_stats, find_entities, title_pattern, token_classes
from engram.analysis.gates import gate_values
from engram.analysis.knowledge import answer_scores, country_capitals, probe_facts, split_stated
from engram.config import EngramConfig, ModelConfig
from engram.data.tokenizer import train_tokenizer

V, D = 300, 32
CORPUS = ["Alexander the Great ruled Macedon. Kabul is the capital of Afghanistan.",
          "The Prime Minister lives in London. Paris is a city in France."] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=V)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        vocab_size=V, hidden_size=D, n_layers=2, n_heads=4, mlp_hidden_size=48, n_streams=2, max_seq_len=64,
        engram=EngramConfig(compressed_vocab_size=V, pad_id=0, layer_ids=(0, 1), rows_per_head=(101, 103),
                            n_head_per_ngram=2, n_embed_per_ngram=16,
                            conv_zero_init=False, table_init_std=1.0))  # untrained rows that say something
    torch.manual_seed(0)
    return EngramLM(config).eval()


class UniformLM(torch.nn.Module):
    """Every next token equally likely: an answer of n tokens scores exactly -n log V."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, ids):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, V) + self.w})()


def test_country_capitals_are_real_facts():
    facts = dict(country_capitals())
    assert len(facts) > 200
    assert facts["France"] == "Paris" and facts["Japan"] == "Tokyo" and facts["Kenya"] == "Nairobi"
    assert all(isinstance(c, str) and c for c in facts.values())


def test_split_stated_needs_subject_answer_and_cue_in_one_sentence():
    docs = ["Kabul is the capital of Afghanistan. Paris is nice.", "France is big. Its capital is Paris.",
            "Tokyo, the capital of Japan, is large."]
    stated, unstated = split_stated([("Afghanistan", "Kabul"), ("France", "Paris"), ("Japan", "Tokyo")], docs)
    assert stated == [("Afghanistan", "Kabul"), ("Japan", "Tokyo")]
    assert unstated == [("France", "Paris")]  # named in two different sentences only


def test_answer_scores_equal_one_sequence_at_a_time(model, tok):
    prompts = ["Kabul is the capital of", "The Prime Minister lives in", "Alexander the"]
    answers = ["Afghanistan", "London", "Great ruled Macedon"]
    logprob, greedy = answer_scores(model, tok, prompts, answers, batch_size=2)  # padded batches
    for i, (p, a) in enumerate(zip(prompts, answers)):
        p_ids = tok.encode(p, add_special_tokens=False).ids
        a_ids = tok.encode(" " + a, add_special_tokens=False).ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([p_ids + a_ids])).logits[0].double(), -1)
        steps = [(len(p_ids) - 1 + j, t) for j, t in enumerate(a_ids)]
        assert logprob[i] == pytest.approx(sum(logp[k, t].item() for k, t in steps), abs=1e-4)
        assert greedy[i] == all(logp[k].argmax().item() == t for k, t in steps)


def test_probe_facts_with_a_uniform_model(tok):
    facts = [("France", "Paris"), ("Japan", "Tokyo"), ("Kenya", "Nairobi")]
    res = probe_facts(UniformLM(), tok, facts, n_distractors=2)
    n_tokens = [len(tok.encode(" " + a, add_special_tokens=False).ids) for _, a in facts]
    assert res["mean_answer_logprob"] == pytest.approx(-np.mean(n_tokens) * math.log(V), rel=1e-6)
    assert res["chance"] == pytest.approx(1 / 3) and res["n"] == 3
    # the shortest answer wins under a uniform model; ties count as wrong
    shortest = min(n_tokens)
    expected = [n == shortest and sorted(n_tokens).count(shortest) == 1 for n in n_tokens]
    assert res["correct"] == expected
    assert res["greedy_exact"] == 0.0  # argmax of a flat distribution is token 0, never the answer here
    with pytest.raises(ValueError, match="no facts"):
        probe_facts(UniformLM(), tok, [])


def test_in_context_prompt_states_the_fact(tok, monkeypatch):
    import engram.analysis.knowledge as knowledge

    seen = {}

    def fake_scores(model, tokenizer, prompts, answers, **kw):
        seen.setdefault("prompts", prompts)  # the first call scores the facts (the second, the neutral prompt)
        seen.setdefault("answers", answers)
        return np.arange(len(prompts), 0, -1, dtype=float), np.zeros(len(prompts), dtype=bool)

    monkeypatch.setattr(knowledge, "answer_scores", fake_scores)
    res = probe_facts(None, tok, [("France", "Paris"), ("Japan", "Tokyo")], in_context=True, n_distractors=1)
    assert seen["prompts"][0] == "The capital of France is Paris. The capital of France is"
    assert seen["answers"][:2] == ["Paris", "Tokyo"]  # the true answer first, then a distractor
    assert res["accuracy"] == 1.0  # the first candidate of each fact has the highest fake score


def test_find_entities_and_token_classes():
    pattern = title_pattern(["Alexander the Great", "Great", "Macedon (kingdom)", "UK"])
    text = "Alexander the Great ruled Macedon. Great!"
    assert find_entities(text, pattern) == [(0, 19), (26, 33), (35, 40)]  # longest first; bracket cut; "UK" too short
    assert title_pattern([]) is None and find_entities(text, None) == []
    offsets = [(0, 9), (9, 13), (13, 19), (19, 25), (25, 33), (33, 34), (35, 38), (38, 40)]
    spans = [(0, 19), (26, 33), (35, 40)]
    # first, middle, last; a one-token entity counts as other; a two-token one is first + last
    assert token_classes(offsets, spans).tolist() == [0, 1, 2, 3, 3, 3, 0, 2]


def test_entity_gate_stats_average_the_gate_values(model, tok):
    docs = ["Alexander the Great ruled Macedon.", "The Prime Minister lives in London."]
    titles = ["Alexander the Great", "Prime Minister", "London"]
    stats = entity_gate_stats(model, tok, docs, titles)
    pattern = title_pattern(titles)
    sums = {layer: np.zeros(4) for layer in (0, 1)}
    counts = np.zeros(4)
    for text in docs:
        g = gate_values(model, tok, text)
        enc = tok.encode(text, add_special_tokens=False)
        cls = token_classes(enc.offsets, find_entities(text, pattern))
        counts += np.bincount(cls, minlength=4)
        for layer in (0, 1):
            sums[layer] += np.bincount(cls, weights=g["gates"][layer].mean(1), minlength=4)
    assert counts[0] >= 2 and counts[2] >= 2  # both multi-token names were found
    for layer in (0, 1):
        assert stats[layer]["n_entity_last"] == counts[2]
        for i, name in enumerate(("entity_first", "entity_middle", "entity_last", "other")):
            assert stats[layer][name] == pytest.approx(sums[layer][i] / counts[i], abs=1e-6)


def test_calibrated_accuracy_removes_the_answer_prior(tok, monkeypatch):
    """A model that prefers a frequent answer everywhere but raises the true answer after its own
    subject: raw accuracy 0, calibrated (PMI) accuracy 1."""
    import engram.analysis.knowledge as knowledge

    prior = {"Paris": 0.0, "Tokyo": 0.0, "Nairobi": 10.0}
    truth = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi"}

    def fake_scores(model, tokenizer, prompts, answers, **kw):
        lp = [prior[a] + (2.0 if any(s in p and truth[s] == a for s in truth) else 0.0)
              for p, a in zip(prompts, answers)]
        return np.array(lp), np.zeros(len(prompts), dtype=bool)

    monkeypatch.setattr(knowledge, "answer_scores", fake_scores)
    res = probe_facts(None, tok, [("France", "Paris"), ("Japan", "Tokyo")], pool=list(prior), n_distractors=2)
    assert res["accuracy"] == 0.0  # Nairobi's prior (10) beats the true answer's 0 + 2
    assert res["calibrated_accuracy"] == 1.0  # only the true answer gains over "this country"
