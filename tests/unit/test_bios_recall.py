"""Bits of knowledge and exact match from answer scores: the accounting of bios_recall, with the
scores given (a model that knows some facts exactly, nothing of the rest)."""

import math

import numpy as np
import pytest

from engram.analysis import bios_recall as br
from engram.data.synthetic_bios import ATTRIBUTES, attribute_choices, synthetic_documents


def test_bits_and_exact_match_follow_the_answer_scores(monkeypatch):
    world, _, _, probes = synthetic_documents(10, 0, qa_fraction=0.5)
    people = [vars(p) for p in world.people]
    calls = []

    def fake_scores(model, tokenizer, prompts, answers, **kw):
        calls.append(prompts)
        # cities (birth and employer's) are known for sure (0 nats, greedy right); the rest costs 50 nats
        known = np.array([a in world.cities for a in answers])
        return np.where(known, 0.0, -50.0), known

    monkeypatch.setattr(br, "answer_scores", fake_scores)
    out = br.bios_recall(None, None, people, probes)
    assert len(calls) == 4 and [len(c) for c in calls] == [60, 30, 30, 60]  # qa conditions: 5 people each
    bio = out["conditions"]["bio"]
    assert bio["exact_match"] == pytest.approx(2 / 6) and bio["attributes"]["birth_city"]["exact_match"] == 1.0
    assert bio["attributes"]["employer_city"]["exact_match"] == 1.0 and bio["attributes"]["major"]["exact_match"] == 0
    # birth_city: 10 people x log2(200) bits; the employer's city adds none (the employer decides it);
    # the others cost more than log2 |D| bits: 0
    assert out["bits_by_attribute"]["birth_city"] == pytest.approx(10 * math.log2(200))
    assert out["bits"] == pytest.approx(10 * math.log2(200)) and "employer_city" not in out["bits_by_attribute"]
    assert out["bits_max"] == pytest.approx(10 * sum(math.log2(c) for c in attribute_choices().values()))
    assert all(p.startswith("Question:") for p in calls[1])
    # in context: the held-out biography of the person comes first and states the answer
    assert all(world.people[0].name in p for p in calls[3][:len(ATTRIBUTES)])


def test_a_sample_of_people_scales_bits_to_all(monkeypatch):
    world, _, _, probes = synthetic_documents(20, 1)
    monkeypatch.setattr(br, "answer_scores", lambda m, t, prompts, answers, **kw:
                        (np.full(len(prompts), -math.log(2)), np.zeros(len(prompts), bool)))
    out = br.bios_recall(None, None, [vars(p) for p in world.people], probes, max_people=5)
    assert out["evaluated_people"] == 5 and out["conditions"]["bio"]["n_people"] == 5
    assert out["bits_by_attribute"]["major"] == pytest.approx(20 * (math.log2(100) - 1))
