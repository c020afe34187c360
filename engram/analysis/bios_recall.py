"""What a model knows about the people of a synthetic-bios corpus, and how many bits that is.

    recall = bios_recall(model, tokenizer, people, probes)   # exact match per condition and attribute
    recall["bits"]                                           # knowledge stored, in bits

Conditions, each per attribute (exact match: greedy decoding reproduces every answer token):
- `bio`: closed book, a training template cut before the value ("X was born in" -> city);
- `qa_trained` / `qa_held_out`: the QA question for people whose QA pairs were / were not in
  training (the second is knowledge extraction: those facts were seen only in biographies);
- `in_context`: the person's held-out-template biography, then the `bio` prompt: the answer is
  in the prompt (reading, not recall; the paper's split between the two).

Bits follow "Physics of Language Models" part 3.3: an attribute with `|D|` possible values whose
value tokens cost the model `p` nats on average (over people, closed book) holds at least
`N * max(0, log2 |D| - p / ln 2)` bits over `N` people. We sum that over the five attributes that
carry information (the employer's city is a function of the employer) and leave out the names'
own bits, so it is a lower bound on what the model stores.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..data.synthetic_bios import ATTRIBUTES, Person, attribute_choices, biography, completion_prompt, qa_prompt
from .knowledge import answer_scores

CONDITIONS = ("bio", "qa_trained", "qa_held_out", "in_context")


def _prompt(condition: str, person: Person, attribute: str, context: str) -> str:
    if condition == "bio":
        return completion_prompt(person, attribute)
    if condition == "in_context":
        return context + " " + completion_prompt(person, attribute)
    return qa_prompt(person, attribute)


def bios_recall(model: Any, tokenizer: Any, people: Sequence[dict], probes: Sequence[dict], *,
                max_people: int | None = None, seed: int = 0, only: Sequence[int] | None = None,
                conditions: Sequence[str] = CONDITIONS) -> dict[str, Any]:
    """Exact-match recall per condition and attribute, and the bits of knowledge of the `bio`
    condition, over `people` (records of people.jsonl) and `probes` (records of probes.jsonl).
    `max_people`: evaluate a seeded sample of that many people (bits are scaled to all); `only`:
    evaluate these people (indices into `people`) instead. Bits need the `bio` condition."""
    if not people:
        raise ValueError("no people to probe")
    persons = [Person(**p) for p in people]
    qa_trained = {p["person"] for p in probes if p["in_training"]}
    rng = np.random.default_rng(seed)
    if only is not None:
        chosen = sorted(int(i) for i in only)
        if not chosen or chosen[0] < 0 or chosen[-1] >= len(persons):
            raise ValueError(f"only= must name people 0..{len(persons) - 1}, got {list(only)[:5]}")
    else:
        chosen = sorted(rng.choice(len(persons), size=min(max_people or len(persons), len(persons)), replace=False))
    out: dict[str, Any] = {"people": len(persons), "evaluated_people": len(chosen), "conditions": {}}
    for condition in conditions:
        who = [i for i in chosen if condition != "qa_trained" or i in qa_trained]
        who = [i for i in who if condition != "qa_held_out" or i not in qa_trained]
        if not who:
            continue
        prompts, answers, attrs = [], [], []
        for i in who:
            person = persons[i]
            context = biography(person, np.random.default_rng([seed, i]), held_out=True)
            for attribute in ATTRIBUTES:
                prompts.append(_prompt(condition, person, attribute, context))
                answers.append(getattr(person, attribute))
                attrs.append(attribute)
        logprob, greedy = answer_scores(model, tokenizer, prompts, answers)
        attrs_a = np.array(attrs)
        per_attr = {a: {"exact_match": float(greedy[attrs_a == a].mean()),
                        "answer_nats": float(-logprob[attrs_a == a].mean())} for a in ATTRIBUTES}
        out["conditions"][condition] = {"n_people": len(who), "exact_match": float(greedy.mean()),
                                        "attributes": per_attr}
    if "bio" not in out["conditions"]:
        return out
    bio = out["conditions"]["bio"]["attributes"]
    choices = attribute_choices()
    bits = {a: len(persons) * max(0.0, math.log2(choices[a]) - bio[a]["answer_nats"] / math.log(2))
            for a in ATTRIBUTES if choices[a] > 1}
    out["bits_by_attribute"] = bits
    out["bits"] = sum(bits.values())
    out["bits_max"] = len(persons) * sum(math.log2(c) for c in choices.values())
    return out
