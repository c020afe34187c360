"""Experiments that read trained models: knowledge probes and gates on named entities.

Both use the arms of `ablations` ("full": the preset with Engram, "no_engram": the same
backbone without it), trained longer by default (1,000 steps, ~1.8 epochs of wiki-en: a fact
has to be seen more than once to be learned), training them first when their runs are missing, so
each runs on its own and costs only evaluation when the runs exist.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from ..analysis.ablation import engram_disabled
from ..analysis.entities import CLASSES, entity_gate_stats
from ..analysis.gates import plot_gates
from ..analysis.knowledge import (CONTEXT_TEMPLATE, REVERSE_CONTEXT_TEMPLATE, REVERSE_TEMPLATE, TEMPLATE,
                                  country_capitals, probe_facts, split_stated)
from ..data.corpora import read_records
from ..data.dataset import PreparedData
from .common import (SHARED_RUNS, base_config, figure, newest_model, preset_model, run_dir, spread, train_arm,
                     write_results)

# The paper's gate figure sentence, and a second one of the same kind.
EXAMPLE_TEXT = ("Alexander the Great was a king of the ancient Greek kingdom of Macedon. "
                "The Prime Minister of the United Kingdom lives in London.")


def _trained_models(out: Path, data_dir, arms: dict, base, seeds, log):
    """{arm: [model per seed]}, training the runs that are missing."""
    models = {}
    for name, config in arms.items():
        run_name = SHARED_RUNS.get(name, name)
        train_arm(out, run_name, config, base, data_dir, seeds, log)
        models[name] = [newest_model(run_dir(out, run_name, base.max_steps, s), log) for s in seeds]
    return models



def run_knowledge_probes(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 1000,
                         preset: str = "tiny", n_distractors: int = 9, facts=None, log=print) -> dict[str, Any]:
    """Country -> capital multiple choice, facts stated in the training corpus vs not, for the
    Engram model (as is and with Engram zeroed) and the backbone without Engram, closed book
    and with the fact given in the prompt (the in-context control). `facts`: (country, capital)
    pairs, default all of countryinfo's; a group with no facts is left out."""
    out = Path(out_dir)
    base = base_config(preset, steps)
    data = PreparedData.open(data_dir)
    full = preset_model(base, data)
    models = _trained_models(out, data_dir, {"full": full, "no_engram": dataclasses.replace(full, engram=None)},
                             base, seeds, log)
    facts = list(facts) if facts is not None else country_capitals()
    stated, unstated = split_stated(facts, (r["text"] for r in read_records(data_dir, "train")))
    groups = {name: group for name, group in (("stated", stated), ("unstated", unstated)) if group}
    # both directions of each fact: (facts, answer pool, template, in-context template, neutral subject)
    phrasings = {"country_to_capital": (lambda fs: fs, [a for _, a in facts], TEMPLATE, CONTEXT_TEMPLATE,
                                        "this country"),
                 "capital_to_country": (lambda fs: [(a, s) for s, a in fs], [s for s, _ in facts],
                                        REVERSE_TEMPLATE, REVERSE_CONTEXT_TEMPLATE, "This city")}
    conditions = {"full": [("closed_book", False, False), ("closed_book_engram_zeroed", False, True),
                           ("in_context", True, False), ("in_context_engram_zeroed", True, True)],
                  "no_engram": [("closed_book", False, False), ("in_context", True, False)]}
    results: dict[str, Any] = {
        "experiment": "knowledge_probes", "preset": preset, "steps": steps, "seeds": list(seeds),
        "data": str(data_dir), "facts": {g: len(f) for g, f in groups.items()}, "n_distractors": n_distractors,
        "chance": 1 / (n_distractors + 1), "phrasings": {k: v[2] for k, v in phrasings.items()}, "scores": {}}
    for arm, conds in conditions.items():
        results["scores"][arm] = {}
        for cond, in_context, zeroed in conds:
            results["scores"][arm][cond] = {}
            for group, group_facts in groups.items():
                runs = []  # one per (seed, phrasing): accuracies are averaged over both phrasings
                for model in models[arm]:
                    for orient, pool, template, context_template, neutral in phrasings.values():
                        with engram_disabled(model, layers=None if zeroed else []):  # [] zeroes nothing
                            runs.append(probe_facts(model, data.tokenizer, orient(group_facts), in_context=in_context,
                                                    pool=pool, n_distractors=n_distractors, template=template,
                                                    context_template=context_template, neutral_subject=neutral))
                per_seed = {metric: [statistics.mean(r[metric] for r in runs[i:i + len(phrasings)])
                                     for i in range(0, len(runs), len(phrasings))]
                            for metric in ("accuracy", "calibrated_accuracy", "greedy_exact", "mean_answer_logprob")}
                by_phrasing = {name: {m: statistics.mean(r[m] for r in runs[j::len(phrasings)])
                                      for m in ("accuracy", "calibrated_accuracy")}
                               for j, name in enumerate(phrasings)}
                results["scores"][arm][cond][group] = {**{m: spread(v) for m, v in per_seed.items()},
                                                       "accuracy_by_phrasing": by_phrasing}
                got = results["scores"][arm][cond][group]
                log(f"{arm} {cond} {group}: accuracy {got['accuracy']['mean']:.3f}, "
                    f"calibrated {got['calibrated_accuracy']['mean']:.3f}")
    full_scores = results["scores"]["full"]
    results["kept_fraction"] = {
        metric: {group: {setting: _kept(full_scores[setting][group][metric]["mean"],
                                        full_scores[f"{setting}_engram_zeroed"][group][metric]["mean"],
                                        results["chance"])
                         for setting in ("closed_book", "in_context")} for group in groups}
        for metric in ("accuracy", "calibrated_accuracy")}
    write_results(out, results, _plot_probes)
    return results


def _kept(full: float, zeroed: float, chance: float) -> dict[str, float | None]:
    """The share of accuracy kept with Engram zeroed: raw (as the paper reports) and above chance."""
    return {"raw": zeroed / full if full > 0 else None,
            "above_chance": (zeroed - chance) / (full - chance) if full > chance else None}


def _plot_probes(results: dict[str, Any], path: Path) -> None:
    bars = [("full", "closed_book"), ("full", "closed_book_engram_zeroed"), ("no_engram", "closed_book"),
            ("full", "in_context"), ("full", "in_context_engram_zeroed"), ("no_engram", "in_context")]
    groups = list(results["facts"])
    fig, axes = figure((13, 4.2), ncols=2)
    width = 0.8 / len(groups)
    for ax, metric, what in zip(axes, ("accuracy", "calibrated_accuracy"), ("raw", "calibrated (PMI)")):
        for j, group in enumerate(groups):
            s = [results["scores"][arm][cond][group][metric] for arm, cond in bars]
            ax.bar([i + j * width for i in range(len(bars))], [x["mean"] for x in s], width,
                   yerr=[x["std"] for x in s], capsize=2, label=f"{group} ({results['facts'][group]} facts)")
        ax.axhline(results["chance"], color="k", ls="--", lw=0.8, label="chance")
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(bars))],
                      [arm + "\n" + cond.replace("_engram_zeroed", ",\nEngram 0").replace("_", " ")
                       for arm, cond in bars], fontsize=7)
        ax.set_ylabel(f"{what} accuracy (1 of {results['n_distractors'] + 1})")
        ax.set_title(f"country <-> capital, {what}, {results['preset']}, {results['steps']} steps, "
                     f"{len(results['seeds'])} seeds", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def run_entity_gates(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 1000,
                     preset: str = "tiny", log=print) -> dict[str, Any]:
    """Mean Engram gate on the first, middle and last tokens of multi-token entities (the corpus's
    document titles found in validation text) against other tokens, per layer and seed; plus a
    gate heatmap of an example text (HTML and PNG) from the first seed's model."""
    out = Path(out_dir)
    base = base_config(preset, steps)
    data = PreparedData.open(data_dir)
    models = _trained_models(out, data_dir, {"full": preset_model(base, data)}, base, seeds, log)["full"]
    val_records = read_records(data_dir, "val")
    records = read_records(data_dir, "train") + val_records
    titles = [r["title"] for r in records if r.get("title")]
    if not titles:
        raise ValueError(f"the corpus in {data_dir} has no document titles to take entity names from; "
                         "use a wiki corpus (engram data build --corpus wiki-en)")
    val_texts = [r["text"] for r in val_records]
    per_seed = [entity_gate_stats(m, data.tokenizer, val_texts, titles) for m in models]
    layers = sorted(per_seed[0])
    results: dict[str, Any] = {"experiment": "entity_gates", "preset": preset, "steps": steps, "seeds": list(seeds),
                               "data": str(data_dir), "titles": len(set(titles)), "layers": {}}
    for layer in layers:
        entry = {name: spread([s[layer][name] for s in per_seed]) for name in CLASSES}
        entry["tokens"] = {name: per_seed[0][layer][f"n_{name}"] for name in CLASSES}
        entry["last_minus_other"] = spread([s[layer]["entity_last"] - s[layer]["other"] for s in per_seed])
        results["layers"][str(layer)] = entry
        log(f"layer {layer}: gate on entity tokens, first {entry['entity_first']['mean']:.3f}, middle "
            f"{entry['entity_middle']['mean']:.3f}, last {entry['entity_last']['mean']:.3f}; other tokens "
            f"{entry['other']['mean']:.3f}")
    results["example"] = {k: str(v) for k, v in plot_gates(models[0], data.tokenizer, EXAMPLE_TEXT, out,
                                                           name="entity_gates_example").items()}
    write_results(out, results, _plot_entity_gates)
    return results


def _plot_entity_gates(results: dict[str, Any], path: Path) -> None:
    layers = list(results["layers"])
    fig, ax = figure((5.5, 3.8))
    width = 0.8 / len(CLASSES)
    for j, name in enumerate(CLASSES):
        s = [results["layers"][l][name] for l in layers]
        ax.bar([i + j * width for i in range(len(layers))], [x["mean"] for x in s], width,
               yerr=[x["std"] for x in s], capsize=3,
               label=f"{name.replace('_', ' ')} ({results['layers'][layers[0]]['tokens'][name]:,} tokens)")
    ax.set_xticks([i + width * (len(CLASSES) - 1) / 2 for i in range(len(layers))],
                  [f"Engram layer {l}" for l in layers])
    ax.set_ylabel("mean gate")
    ax.set_title(f"gates on multi-token entities, {results['preset']}, {len(results['seeds'])} seeds", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    """Human lines of a knowledge_probes or entity_gates result."""
    lines = []
    if result["experiment"] == "knowledge_probes":
        lines.append(f"multiple-choice accuracy, raw / calibrated (chance {result['chance']:.2f}), mean over seeds:")
        for arm, conds in result["scores"].items():
            for cond, groups in conds.items():
                lines.append(f"{arm:9s} {cond:26s} " + "  ".join(
                    f"{g} {v['accuracy']['mean']:.3f} / {v['calibrated_accuracy']['mean']:.3f}"
                    for g, v in groups.items()))
    else:
        for layer, e in result["layers"].items():
            lines.append(f"layer {layer}: mean gate on entity tokens, first {e['entity_first']['mean']:.3f}, middle "
                         f"{e['entity_middle']['mean']:.3f}, last {e['entity_last']['mean']:.3f}; other tokens "
                         f"{e['other']['mean']:.3f}")
        lines.append(f"example heatmap: {result['example']['html']}")
    return lines
