"""Knowledge capacity on synthetic biographies: does Engram store more facts per parameter than
an MoE at the same total and active parameters?

At each model size: the MoE (the preset without Engram), Engram at the same total and active
parameters (the planner), and OverEncoding (the same tables on the input, no gate, no conv), the
last two also with table rows that start at zero. Controls at the largest size: capacity 1 (one row
per head), other table sizes, Engram zeroed at inference, and the fact given in context. Each
trained model is probed with `engram.analysis.bios_recall` (exact match per condition, bits of
knowledge); probes are saved in the run folder (`recall.json`) so a finished run costs nothing
when the experiment resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..analysis.ablation import engram_disabled
from ..analysis.bios_recall import CONDITIONS, bios_recall
from ..config import ModelConfig
from ..model.accounting import count_params
from ..model.planner import plan_sparsity
from ..data.corpora import read_extra_records
from ..data.dataset import PreparedData
from .common import (REFERENCE_INIT, base_config, cached_json, engram_changed, figure, init_suffix, newest_model,
                     over_encoding, paired, preset_model, reference_init, run_dir, spread, train_arm, write_results)

# the init each Engram arm is also trained at, beside the reference (zero rows <-> N(0, 1))
OTHER_INIT = 1.0 if REFERENCE_INIT == 0.0 else 0.0
# model sizes: changes to the preset (Engram follows the model's width)
SIZES = {"d64": {"hidden_size": 64}, "d128": {}}


def knowledge_configs(base, data: PreparedData, size: str, *, rho: float = 0.75, controls: bool = False,
                      table_scales=(1 / 16, 4)) -> dict[str, ModelConfig]:
    """The arms at one size: moe, engram (planned to the MoE's total and active parameters),
    over_encoding, and both with the other init (`OTHER_INIT`: N(0, 1) rows, named `_init1`,
    beside the reference's zero rows); with `controls`, capacity_1 and the planned tables
    scaled by `table_scales`."""
    full = dataclasses.replace(preset_model(base, data), **SIZES[size])
    moe = dataclasses.replace(full, engram=None)
    planned = plan_sparsity(moe, rho, compressed_vocab_size=full.engram.compressed_vocab_size,
                            pad_id=full.engram.pad_id)
    arms = {"moe": moe, "engram": planned, "over_encoding": over_encoding(planned)}
    if controls:
        arms["capacity_1"] = engram_changed(planned, single_row=True)
        for scale in table_scales:
            rows = tuple(max(1, round(r * scale)) for r in planned.engram.rows_per_head)
            arms[f"table_x{scale:g}"] = engram_changed(planned, rows_per_head=rows)
    for name in ("engram", "over_encoding"):
        arms[name + init_suffix(OTHER_INIT)] = engram_changed(arms[name], table_init_std=OTHER_INIT)
    return arms


def _recall(folder: Path, data: PreparedData, people, probes, max_people: int, log) -> dict[str, Any]:
    """The run's probes (cached in recall.json, reused when it probed as many people as asked
    for now): as trained, and with Engram zeroed."""
    def compute():
        model = newest_model(folder, log)
        result = {"as_trained": bios_recall(model, data.tokenizer, people, probes, max_people=max_people)}
        if model.config.engram is not None:
            with engram_disabled(model):
                result["engram_zeroed"] = bios_recall(model, data.tokenizer, people, probes, max_people=max_people)
        return result

    return cached_json(folder / "recall.json", compute,
                       reuse=lambda c: c["as_trained"]["evaluated_people"] == min(max_people, len(people)))


def _arm_summary(recalls: list[dict], params: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"params": params}
    for variant in ("as_trained", "engram_zeroed"):
        if variant not in recalls[0]:
            continue
        rs = [r[variant] for r in recalls]
        out[variant] = {
            "bits": spread([r["bits"] for r in rs]),
            "bits_per_total_param": spread([r["bits"] / params["total"] for r in rs]),
            "bits_per_active_param": spread([r["bits"] / params["active"] for r in rs]),
            "exact_match": {c: spread([r["conditions"][c]["exact_match"] for r in rs])
                            for c in CONDITIONS if c in rs[0]["conditions"]}}
    return out


def run_knowledge_capacity(out_dir: str | Path, data_dir: str | Path, *, sizes=tuple(SIZES), seeds=(0, 1, 2),
                           steps: int = 1000, preset: str = "tiny", rho: float = 0.75, max_people: int = 500,
                           controls: bool = True, log=print) -> dict[str, Any]:
    """Train every arm at every size over seeds (resumable), probe each model, and compare. The
    controls (capacity 1, other table sizes) run at the largest size; `controls=False` skips them."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    people, probes = read_extra_records(data_dir, "people"), read_extra_records(data_dir, "probes")
    base = base_config(preset, steps)
    results: dict[str, Any] = {"experiment": "knowledge_capacity", "preset": preset, "steps": steps,
                               "seeds": list(seeds), "data": str(data_dir), "people": len(people), "rho": rho,
                               "reference_init": REFERENCE_INIT, "bits_max": None, "sizes": {}}
    largest = list(sizes)[-1]
    for size in sizes:
        arms = knowledge_configs(base, data, size, rho=rho, controls=controls and size == largest)
        results["sizes"][size] = {}
        for name, config in arms.items():
            run_name = f"knowledge_{size}_{name}"
            train_arm(out, run_name, config, base, data_dir, seeds, log)
            recalls = [_recall(run_dir(out, run_name, steps, s), data, people, probes, max_people, log)
                       for s in seeds]
            p = count_params(config)
            summary = _arm_summary(recalls, {"total": p["total"], "active": p["active"], "engram": p["engram"]})
            results["sizes"][size][name] = summary
            results["bits_max"] = recalls[0]["as_trained"]["bits_max"]
            log(f"{size} {name}: bits {summary['as_trained']['bits']['mean']:.0f}, closed-book exact match "
                f"{summary['as_trained']['exact_match']['bio']['mean']:.3f}")
        moe_bits = results["sizes"][size]["moe"]["as_trained"]["bits"]["by_seed"]
        for name, arm in results["sizes"][size].items():
            arm["bits_minus_moe"] = paired(arm["as_trained"]["bits"]["by_seed"], moe_bits)
    write_results(out, results, _plot)
    return results


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, (left, right) = figure((11, 5), ncols=2)
    sizes = list(results["sizes"])
    names = list(dict.fromkeys(n for s in sizes for n in results["sizes"][s]))  # the arms' order, every time
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + j * width for i, s in enumerate(sizes) if name in results["sizes"][s]]
        arms = [results["sizes"][s][name] for s in sizes if name in results["sizes"][s]]
        left.bar(xs, [a["as_trained"]["bits_per_active_param"]["mean"] for a in arms], width,
                 yerr=[a["as_trained"]["bits_per_active_param"]["std"] for a in arms], capsize=2, label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], sizes)
    left.set_ylabel("bits of knowledge per active parameter")
    left.set_title(f"{results['people']} people, {results['steps']} steps, {len(results['seeds'])} seeds",
                   fontsize=9)
    left.legend(fontsize=7, ncols=2)
    left.grid(axis="y", alpha=0.3)
    size = sizes[-1]
    conds = list(CONDITIONS)
    shown = [n for n in names if n in results["sizes"][size]]
    ref = reference_init(results)
    other = 1.0 if ref == 0.0 else 0.0
    zeroed = [n for n in ("engram", "engram" + init_suffix(other, ref)) if n in shown]  # Engram zeroed at inference
    bars = [(n, "as_trained") for n in shown] + [(n, "engram_zeroed") for n in zeroed]
    width = 0.8 / len(bars)
    for j, (name, variant) in enumerate(bars):
        em = results["sizes"][size][name][variant]["exact_match"]
        right.bar([i + j * width for i in range(len(conds))], [em[c]["mean"] if c in em else 0 for c in conds],
                  width, yerr=[em[c]["std"] if c in em else 0 for c in conds], capsize=2,
                  label=name + (" (zeroed)" if variant == "engram_zeroed" else ""))
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(conds))], conds, fontsize=8)
    right.set_ylabel("exact match (greedy answer)")
    right.set_title(f"attribute recall by condition, {size}", fontsize=9)
    right.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    right.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    """Human lines of a knowledge_capacity result."""
    lines = [f"{result['people']} people ({result['bits_max']:.0f} bits to store), {len(result['seeds'])} seeds:"]
    for size, arms in result["sizes"].items():
        for name, arm in arms.items():
            a = arm["as_trained"]
            em = "  ".join(f"{c} {v['mean']:.3f}" for c, v in a["exact_match"].items())
            zeroed = (f"; Engram zeroed: bio {arm['engram_zeroed']['exact_match']['bio']['mean']:.3f}"
                      if "engram_zeroed" in arm else "")
            lines.append(f"{size} {name:14s} bits {a['bits']['mean']:8.0f} ± {a['bits']['std']:.0f} "
                         f"({a['bits_per_active_param']['mean']:.4f}/active param, "
                         f"{a['bits_per_total_param']['mean']:.4f}/total), {arm['bits_minus_moe']['mean']:+.0f} vs "
                         f"moe; exact match {em}{zeroed}")
    return lines
