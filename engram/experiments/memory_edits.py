"""Forget and rewrite one person's facts in the memory of a synthetic-bios model, and measure what
else moves (the practical promise of a separate memory, and its risk).

On the Engram arms of `knowledge_capacity` (d128, trained there, reused here), per seed:
  - targets: the people the model recalls best closed book (a forget can only show on known facts);
  - forget: the rows the person's training biographies address are reset (`owned`: only rows the
    text owns, see `engram.memory.editing`; `all`: every row they address), then exact-match
    recall is measured on the target and on a fixed sample of other people;
  - write: a counterfactual birth city, as a biography sentence and as its QA pair ("X was born in
    Y." and "Question: Where was X born? Answer: Y"), is trained into the rows those texts own (or
    all they address); then: does the model answer Y in both forms, and what did others lose?
Chance is the mean over attributes of 1/|values|. Edits are made in memory on a fresh copy of the
model each time; the run folders are only read (the row index is built beside each run once).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.bios_recall import bios_recall
from ..analysis.knowledge import answer_scores
from ..lifecycle.memory_ops import INDEX_DIR, index_run, load_index, open_run, rows_for_texts, train_rows
from ..memory.editing import forget_rows, split_rows
from ..data.corpora import read_extra_records, read_records
from ..data.dataset import PreparedData
from ..data.synthetic_bios import ATTRIBUTES, Person, attribute_choices, completion_prompt, qa_prompt
from .common import base_config, figure, paired, run_dir, spread, train_arm, write_results
from .knowledge import knowledge_configs

CLOSED_BOOK = ("bio", "qa_trained", "qa_held_out")


def _recall(model, data, people, probes, who: list[int], attribute: str | None = None) -> float:
    """Closed-book exact match over `who` (every attribute, or one)."""
    r = bios_recall(model, data.tokenizer, people, probes, only=who, conditions=CLOSED_BOOK)
    if attribute is None:
        cells = [(c["n_people"], c["exact_match"]) for c in r["conditions"].values()]
    else:
        cells = [(c["n_people"], c["attributes"][attribute]["exact_match"]) for c in r["conditions"].values()]
    return float(sum(n * v for n, v in cells) / sum(n for n, _ in cells))


def _answers(model, data, person: Person, value: str) -> float:
    """Does greedy decoding give `value` as the birth city, in the bio and the QA form (mean)?"""
    prompts = [completion_prompt(person, "birth_city"), qa_prompt(person, "birth_city")]
    return float(answer_scores(model, data.tokenizer, prompts, [value, value])[1].mean())


def _one_seed(folder: Path, data: PreparedData, people, probes, docs, *, targets: int, others: int, seed: int,
              write_steps: int, write_lr: float, log) -> dict[str, Any]:
    if not (folder / INDEX_DIR / "index.json").is_file():
        index_run(folder, progress=False)
    model, run_json, _ = open_run(folder)
    index = load_index(folder, run_json, model)
    rng = np.random.default_rng(seed)
    pool = sorted(rng.choice(len(people), size=min(len(people), 4 * targets + others), replace=False).tolist())
    candidates = pool[:4 * targets]
    known = sorted(candidates, key=lambda i: -_recall(model, data, people, probes, [i]))[:targets]
    rest = [i for i in pool if i not in known][:others]
    base_rest = _recall(model, data, people, probes, rest)
    cities = sorted({p["birth_city"] for p in people})
    out: dict[str, Any] = {"targets": known, "others": rest, "others_before": base_rest, "cells": []}
    for who in known:
        person = Person(**people[who])
        before = _recall(model, data, people, probes, [who])
        texts = [d["text"] for d in docs if d.get("person") == who]
        new_city = cities[(cities.index(person.birth_city) + 1 + int(rng.integers(len(cities) - 1))) % len(cities)]
        facts = [f"{completion_prompt(person, 'birth_city')} {new_city}.",
                 f"{qa_prompt(person, 'birth_city')} {new_city}"]
        for policy in ("owned", "all"):
            edited = copy.deepcopy(model)
            rows, _ = rows_for_texts(edited, data, index, texts, 64, 0.5)
            tables = {layer: edited.blocks[layer].engram.table for layer in edited.engram_layers}
            n = 0  # a person who owns no row is left as is
            if split_rows(rows, policy == "all")[0]:
                n = len(forget_rows(tables, rows, force=policy == "all", index=index).changed)
            cell = {"person": who, "op": "forget", "policy": policy, "rows": n, "addressed": len(rows),
                    "target_before": before, "target_after": _recall(edited, data, people, probes, [who]),
                    "others_after": _recall(edited, data, people, probes, rest)}
            out["cells"].append(cell)
            edited = copy.deepcopy(model)
            rows, ids = rows_for_texts(edited, data, index, facts, 64, 0.5, inputs_only=True)
            chosen = split_rows(rows, policy == "all")[0]
            if chosen:
                train_rows(edited, ids, chosen, steps=write_steps, lr=write_lr, seed=seed)
            cell = {"person": who, "op": "write", "policy": policy, "rows": len(chosen), "addressed": len(rows),
                    "new_value": new_city, "answers_new_before": _answers(model, data, person, new_city),
                    "answers_new_after": _answers(edited, data, person, new_city),
                    "target_other_attributes_after": float(np.mean(
                        [_recall(edited, data, people, probes, [who], a) for a in ATTRIBUTES if a != "birth_city"])),
                    "others_after": _recall(edited, data, people, probes, rest)}
            out["cells"].append(cell)
            log(f"  person {who} {policy}: forget {out['cells'][-2]['rows']} rows -> target "
                f"{before:.2f}->{out['cells'][-2]['target_after']:.2f}, others {base_rest:.3f}->"
                f"{out['cells'][-2]['others_after']:.3f}; write {len(chosen)} rows -> answers {new_city!r} "
                f"{cell['answers_new_after']:.2f}, others {cell['others_after']:.3f}")
    return out


def run_memory_edits(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 1000,
                     preset: str = "tiny", arms=("engram", "table_x4"), targets: int = 4, others: int = 60,
                     write_steps: int = 100, write_lr: float = 0.1, log=print) -> dict[str, Any]:
    """Forget and counterfactual-write experiments on the d128 Engram arms of knowledge_capacity
    (trained first if missing), over seeds."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    people, probes = read_extra_records(data_dir, "people"), read_extra_records(data_dir, "probes")
    docs = read_records(data_dir, "train")
    base = base_config(preset, steps)
    configs = knowledge_configs(base, data, "d128", controls=True)
    choices = attribute_choices()
    results: dict[str, Any] = {"experiment": "memory_edits", "preset": preset, "steps": steps, "seeds": list(seeds),
                               "data": str(data_dir), "targets": targets, "others": others,
                               "write_steps": write_steps, "write_lr": write_lr,
                               "chance": float(np.mean([1 / choices[a] for a in ATTRIBUTES])), "arms": {}}
    for arm in arms:
        name = f"knowledge_d128_{arm}"
        train_arm(out, name, configs[arm], base, data_dir, seeds, log)
        per_seed = []
        for s in seeds:
            log(f"{name} seed {s}:")
            per_seed.append(_one_seed(run_dir(out, name, steps, s), data, people, probes, docs, targets=targets,
                                      others=others, seed=s, write_steps=write_steps, write_lr=write_lr, log=log))
        results["arms"][arm] = {"by_seed": per_seed, **_summarize(per_seed)}
    write_results(out, results, _plot)
    return results


def _summarize(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (op, policy): seed means of the per-person numbers, then mean ± std over seeds."""
    out: dict[str, Any] = {}
    for op, keys in (("forget", ("rows", "addressed", "target_before", "target_after", "others_after")),
                     ("write", ("rows", "addressed", "answers_new_before", "answers_new_after",
                                "target_other_attributes_after", "others_after"))):
        for policy in ("owned", "all"):
            means = {k: [float(np.mean([c[k] for c in s["cells"] if c["op"] == op and c["policy"] == policy]))
                         for s in per_seed] for k in keys}
            cell = {k: spread(v) for k, v in means.items()}
            cell["others_change"] = paired(means["others_after"], [s["others_before"] for s in per_seed])
            out[f"{op}_{policy}"] = cell
    out["others_before"] = spread([s["others_before"] for s in per_seed])
    return out


def _plot(results: dict[str, Any], path: Path) -> None:
    arms = list(results["arms"])
    fig, axes = figure((6.5 * len(arms), 3.8), ncols=len(arms))
    axes = axes if isinstance(axes, list) else [axes]
    for ax, arm in zip(axes, arms):
        a = results["arms"][arm]
        bars = [("target\nbefore", a["forget_owned"]["target_before"]),
                ("target after\nforget owned", a["forget_owned"]["target_after"]),
                ("target after\nforget all", a["forget_all"]["target_after"]),
                ("others after\nforget all", a["forget_all"]["others_after"]),
                ("says new city\nwrite owned", a["write_owned"]["answers_new_after"]),
                ("says new city\nwrite all", a["write_all"]["answers_new_after"]),
                ("others after\nwrite all", a["write_all"]["others_after"])]
        ax.bar(range(len(bars)), [b[1]["mean"] for b in bars], yerr=[b[1]["std"] for b in bars], capsize=3,
               color=["#888"] + ["#c44"] * 3 + ["#48c"] * 3)
        ax.axhline(a["others_before"]["mean"], color="k", ls="--", lw=0.8, label="others before")
        ax.axhline(results["chance"], color="#c44", ls=":", lw=0.8, label="chance")
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("closed-book exact match")
        ax.set_title(f"{arm}: {results['targets']} people x {len(results['seeds'])} seeds", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    lines = []
    for arm, a in result["arms"].items():
        for key in ("forget_owned", "forget_all", "write_owned", "write_all"):
            c = a[key]
            main = (f"target {c['target_before']['mean']:.2f} -> {c['target_after']['mean']:.2f}" if "forget" in key
                    else f"answers the new value {c['answers_new_after']['mean']:.2f}")
            lines.append(f"{arm:9s} {key:13s} {c['rows']['mean']:.0f}/{c['addressed']['mean']:.0f} rows, {main}, "
                         f"others {c['others_change']['mean']:+.3f} ± {c['others_change']['std']:.3f}")
    return lines
