"""Long-context synthetic tasks in the style of RULER (Hsieh et al., 2024), sized for tiny models:
contexts of about 256 to 1024 tokens (paper Table 2: multi-query NIAH, variable tracking).

- `mq_niah`, multi-query needle in a haystack: `needles` sentences "One of the special magic
  numbers for KEY is: VALUE." hidden at random depths of filler text; then `queries` of the keys
  are asked in turn, each answer a 5-digit number.
- `variable_tracking`: a chain "VAR A = 12345." "VAR B = A." ... of `hops` assignments and a
  distractor chain of another number, spread through filler; the question asks for every
  variable that holds the first number, in the order they were assigned.

A training document is a whole example with its answers; a probe is the example cut before one
answer (earlier answers of the same example stay in the prompt, as in generation). Lengths are
set in filler sentences from an estimate of tokens per sentence; `probes.jsonl` records the
target, and evaluation measures the real token count with the dataset's tokenizer.

    DIR/train.jsonl, val.jsonl, corpus.json   as every corpus (engram.data.corpora)
    DIR/probes.jsonl                          task, target length, prompt, answer (from val examples)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .corpora import seal_corpus, write_jsonl
from .sources import CorpusError
from .synthetic_bios import invented_words

TASKS = ("mq_niah", "variable_tracking")
LENGTHS = (256, 512, 1024)
# RULER's noise haystack: short sentences that carry nothing to remember.
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
          "The river flows to the sea.", "A cloud drifts by.", "The road goes on.")
TOKENS_PER_FILLER = 5.0  # about, for a BPE trained on this corpus; evaluation measures the real length
_UPPER = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))


def _filler(rng: np.random.Generator, n: int) -> list[str]:
    return [FILLER[i] for i in rng.integers(len(FILLER), size=n)]


def _scatter(rng: np.random.Generator, sentences: list[str], inserts: list[str]) -> str:
    """Insert `inserts` into `sentences` at random depths, keeping their order."""
    slots = np.sort(rng.choice(len(sentences) + 1, size=len(inserts), replace=True))
    out, at = [], 0
    for slot, insert in zip(slots.tolist(), inserts):
        out += sentences[at:slot] + [insert]
        at = slot
    return " ".join(out + sentences[at:])


def mq_niah(rng: np.random.Generator, length: int, *, needles: int = 4, queries: int = 2) -> dict[str, Any]:
    """One multi-query needle-in-a-haystack example of about `length` tokens."""
    if not 1 <= queries <= needles:
        raise CorpusError(f"mq_niah needs 1 <= queries <= needles, got queries={queries}, needles={needles}")
    keys = invented_words(rng, needles, set())
    values = [str(v) for v in rng.integers(10_000, 100_000, size=needles)]
    inserts = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    n_filler = max(1, round((length - 14 * needles - 20 * queries) / TOKENS_PER_FILLER))
    context = _scatter(rng, _filler(rng, n_filler), inserts)
    asked = rng.choice(needles, size=queries, replace=False).tolist()
    steps = [(f"What is the special magic number for {keys[i]}? The special magic number for {keys[i]} is:",
              values[i]) for i in asked]
    return {"task": "mq_niah", "target_tokens": length, "context": context, "steps": steps}


def variable_tracking(rng: np.random.Generator, length: int, *, hops: int = 3) -> dict[str, Any]:
    """One variable-tracking example of about `length` tokens."""
    if hops < 1:
        raise CorpusError(f"variable_tracking needs hops >= 1, got {hops}")
    names: list[str] = []
    while len(names) < 2 * hops:  # distinct 4-letter names for both chains
        name = "".join(rng.choice(_UPPER, size=4))
        if name not in names:
            names.append(name)
    first, second = rng.choice(np.arange(10_000, 100_000), size=2, replace=False).tolist()
    chain, other = names[:hops], names[hops:]
    statements = []
    for vars_, number in ((chain, first), (other, second)):
        statements.append([f"VAR {vars_[0]} = {number}."] + [f"VAR {b} = {a}." for a, b in zip(vars_, vars_[1:])])
    # interleave the two chains at random, each in its own order
    order = rng.permutation([0] * hops + [1] * hops).tolist()
    picks = [statements[c].pop(0) for c in order]
    n_filler = max(1, round((length - 16 * hops - 30) / TOKENS_PER_FILLER))
    context = _scatter(rng, _filler(rng, n_filler), picks)
    steps = [(f"Question: Find all variables that are assigned the value {first}. Answer:", " ".join(chain))]
    return {"task": "variable_tracking", "target_tokens": length, "context": context, "steps": steps}


GENERATORS = {"mq_niah": mq_niah, "variable_tracking": variable_tracking}


def render(example: dict[str, Any]) -> str:
    """The whole example as a training document: context, then each question and its answer."""
    return example["context"] + "\n" + "\n".join(f"{q} {a}" for q, a in example["steps"])


def probes_of(example: dict[str, Any]) -> list[dict[str, Any]]:
    """One probe per question: the document cut before that answer."""
    out, prefix = [], example["context"] + "\n"
    for j, (question, answer) in enumerate(example["steps"]):
        out.append({"task": example["task"], "target_tokens": example["target_tokens"], "query": j,
                    "prompt": prefix + question, "answer": answer})
        prefix += f"{question} {answer}\n"
    return out


def long_context_documents(examples: int, seed: int = 0, *, lengths=LENGTHS, tasks=TASKS,
                           val_examples: int | None = None) -> tuple[list[dict], list[dict], list[dict]]:
    """(train documents, validation documents, probes of the validation examples): tasks and
    lengths drawn uniformly, a pure function of the arguments."""
    unknown = sorted(set(tasks) - set(GENERATORS))
    if unknown or not tasks:
        raise CorpusError(f"unknown long-context tasks {unknown or tasks}; choose from {', '.join(GENERATORS)}")
    if examples < 1 or min(lengths) < 64:
        raise CorpusError(f"long-context needs >= 1 example and lengths >= 64 tokens, got {examples} examples, "
                          f"lengths {list(lengths)}")
    n_val = val_examples if val_examples is not None else max(len(tasks) * len(lengths), examples // 10)
    rng = np.random.default_rng(seed)
    made = []
    for i in range(examples + n_val):
        task, length = tasks[i % len(tasks)], lengths[(i // len(tasks)) % len(lengths)]
        made.append(GENERATORS[task](rng, length))
    train = [{"text": render(e), "task": e["task"], "target_tokens": e["target_tokens"]} for e in made[:examples]]
    val = [{"text": render(e), "task": e["task"], "target_tokens": e["target_tokens"]} for e in made[examples:]]
    probes = [p for e in made[examples:] for p in probes_of(e)]
    return train, val, probes


def build_long_context(out_dir: str | os.PathLike, *, examples: int, seed: int = 0, lengths=LENGTHS) -> dict[str, Any]:
    """Write the corpus folder (see the module docstring); returns the corpus.json dict."""
    train, val, probes = long_context_documents(examples, seed, lengths=lengths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": "long-context", "license": "generated by engram-torch (no third-party text)", "seed": seed,
            "examples": examples, "lengths": list(lengths), "tasks": list(TASKS),
            "train": write_jsonl(out / "train.jsonl", train), "val": write_jsonl(out / "val.jsonl", val),
            "extra_files": {"probes": write_jsonl(out / "probes.jsonl", probes)}}
    return seal_corpus(out, info)
