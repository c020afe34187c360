"""Knowledge probes: does the model know "the capital of X is Y", and does it need Engram for it?

    facts = country_capitals()                                 # (country, capital), from countryinfo
    stated, unstated = split_stated(facts, train_documents)    # said in the corpus or not
    probe_facts(model, tokenizer, stated)                      # closed book
    probe_facts(model, tokenizer, stated, in_context=True)     # the fact is given in the prompt
    with engram_disabled(model): probe_facts(...)              # the same without the memory

Each fact is a multiple choice: the true answer against `n_distractors` answers of other facts,
scored by the summed log-probability of the answer's tokens after the prompt (chance is
1 / (n_distractors + 1)). A small model mostly prefers answers that are frequent in its corpus,
whatever the subject; `calibrated_accuracy` removes that preference by scoring each answer by
how much the real subject raises its log-probability over a neutral subject ("The capital of
this country is"), the domain-conditional PMI of Holtzman et al. (2021). `greedy` counts facts
whose answer greedy decoding would produce (every answer token is the argmax under teacher
forcing, which is what greedy decoding does).
The paper (docs/paper.md, Analysis) finds that zeroing Engram hurts closed-book facts far more than
reading comprehension; the in-context control is our small-scale stand-in for the latter.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np
import torch

TEMPLATE = "The capital of {subject} is"
CONTEXT_TEMPLATE = "The capital of {subject} is {answer}. "
# The other direction, as Wikipedia's first sentences put it ("Kabul is the capital of Afghanistan").
REVERSE_TEMPLATE = "{subject} is the capital of"
REVERSE_CONTEXT_TEMPLATE = "{subject} is the capital of {answer}. "
NEUTRAL_SUBJECT = "this country"  # for TEMPLATE; "This city" suits REVERSE_TEMPLATE


def country_capitals() -> list[tuple[str, str]]:
    """(country, capital) pairs from the `countryinfo` package (offline data), sorted by country;
    countries with no capital or several (Antarctica) are left out."""
    try:
        from countryinfo import all_countries
    except ImportError as e:
        raise ImportError("knowledge probes read country facts from the countryinfo package: "
                          "pip install 'engram-torch[experiments]' (or countryinfo==1.0.1)") from e
    facts = set()
    for country in all_countries():
        name, capital = country.name(), country.capital()
        if isinstance(capital, list) and len(capital) == 1:  # e.g. Vatican City State: ["Vatican City"]
            capital = capital[0]
        if isinstance(name, str) and isinstance(capital, str) and name and capital:
            facts.add((name, capital))
    return sorted(facts)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_stated(facts: Sequence[tuple[str, str]], documents: Iterable[str], *, cue: str = "capital"
                 ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(stated, unstated): a fact is stated when one sentence of the documents names its subject,
    its answer and the cue word ("Kabul is the capital of Afghanistan"). Case-sensitive, whole
    strings; a fact that only appears spread over two sentences counts as unstated."""
    sentences = [s for doc in documents for s in _SENTENCE_END.split(doc) if cue in s]
    stated, unstated = [], []
    for subject, answer in facts:
        said = any(subject in s and answer in s for s in sentences)
        (stated if said else unstated).append((subject, answer))
    return stated, unstated


@torch.no_grad()
def answer_scores(model: Any, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str], *,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """For each (prompt, answer): the summed log-probability of the answer's tokens (" " + answer)
    after the prompt, and whether each answer token is the greedy (argmax) choice.

    Sequences are right-padded: with a causal model the padding cannot change earlier positions."""
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logprob, greedy = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=bool)
    cache: dict[str, list[int]] = {}

    def encode(text: str) -> list[int]:
        if text not in cache:
            cache[text] = list(tokenizer.encode(text, add_special_tokens=False).ids)
            if not cache[text]:
                raise ValueError(f"{text!r} is empty after tokenization; every prompt and answer needs a token")
        return cache[text]

    try:
        for lo in range(0, len(prompts), batch_size):
            pairs = [(encode(p), encode(" " + a)) for p, a in zip(prompts[lo:lo + batch_size],
                                                                    answers[lo:lo + batch_size])]
            width = max(len(p) + len(a) for p, a in pairs)
            ids = torch.zeros(len(pairs), width, dtype=torch.long)
            rows, cols, targets, owner = [], [], [], []
            for i, (p, a) in enumerate(pairs):
                ids[i, :len(p) + len(a)] = torch.tensor(p + a)
                rows += [i] * len(a)
                cols += range(len(p) - 1, len(p) + len(a) - 1)  # the positions that predict the answer
                targets += a
                owner += [i] * len(a)
            logits = model(ids.to(device)).logits[torch.tensor(rows), torch.tensor(cols)].float().cpu()
            logp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(targets)
            token_lp = logp.gather(1, target[:, None])[:, 0]
            token_hit = (logp.argmax(-1) == target).double()
            who = torch.tensor(owner)
            n = len(pairs)
            logprob[lo:lo + n] = torch.zeros(n, dtype=torch.float64).index_add_(0, who, token_lp.double()).numpy()
            misses = torch.zeros(n, dtype=torch.float64).index_add_(0, who, 1 - token_hit)
            greedy[lo:lo + n] = (misses == 0).numpy()
    finally:
        model.train(was_training)
    return logprob, greedy


def probe_facts(model: Any, tokenizer: Any, facts: Sequence[tuple[str, str]], *, in_context: bool = False,
                pool: Sequence[str] | None = None, n_distractors: int = 24, seed: int = 0,
                template: str = TEMPLATE, context_template: str = CONTEXT_TEMPLATE,
                neutral_subject: str = NEUTRAL_SUBJECT) -> dict[str, Any]:
    """Multiple-choice accuracy (raw and calibrated), greedy exact match and mean answer
    log-probability over `facts`.

    Distractors are drawn (seeded, the same for every model and condition) from `pool` (default:
    the answers of `facts`), never equal to the true answer. `in_context` prepends the true fact."""
    if not facts:
        raise ValueError("no facts to probe")
    answers_pool = sorted(set(pool if pool is not None else (a for _, a in facts)))
    rng = np.random.default_rng(seed)
    prompts, answers, groups = [], [], []
    for subject, answer in facts:
        others = [a for a in answers_pool if a != answer]
        k = min(n_distractors, len(others))
        if k < 1:
            raise ValueError("need at least one distractor: give more facts or a larger pool")
        choices = [answer] + [others[j] for j in rng.choice(len(others), size=k, replace=False)]
        prefix = context_template.format(subject=subject, answer=answer) if in_context else ""
        prompt = prefix + template.format(subject=subject)
        groups.append(len(choices))
        prompts += [prompt] * len(choices)
        answers += choices
    logprob, greedy = answer_scores(model, tokenizer, prompts, answers)
    candidates = sorted(set(answers))  # each answer's log-probability after the neutral subject
    neutral_lp, _ = answer_scores(model, tokenizer, [template.format(subject=neutral_subject)] * len(candidates),
                                  candidates)
    neutral = dict(zip(candidates, neutral_lp))
    correct, calibrated, exact, true_lp, at = [], [], [], [], 0
    for n in groups:
        scores = logprob[at:at + n]
        gain = scores - np.array([neutral[a] for a in answers[at:at + n]])
        correct.append(bool(scores[0] > scores[1:].max()))  # ties count as wrong
        calibrated.append(bool(gain[0] > gain[1:].max()))
        exact.append(bool(greedy[at]))
        true_lp.append(float(scores[0]))
        at += n
    return {"n": len(facts), "accuracy": float(np.mean(correct)), "calibrated_accuracy": float(np.mean(calibrated)),
            "chance": float(np.mean([1 / n for n in groups])),
            "greedy_exact": float(np.mean(exact)), "mean_answer_logprob": float(np.mean(true_lp)),
            "correct": correct}
