"""How many facts a memory overlay holds, and what writing them costs the rest, against LoRA.

- parent: `retrofit_facts`' base Llama (pretrained here on population A of the synthetic
  biographies; reused, or trained if absent) with an Engram adapter trained on A's texts
  from zero-initialized tables (`table_init_std=0`; base frozen; once, seed 0). Its
  projections are what make rows matter: at their init (std ~1e-3) a written row moves the
  output by ~1e-3, which the first version of this experiment measured as nothing at all;
- a write: K people of A (K = 10 .. 300, nested sets) get a counterfactual birth city, as a
  biography sentence and as its QA pair. Only the table rows train (the base and the
  adapter's projections frozen); the rows that moved are the overlay, saved as an
  `engram.memory.overlay.Overlay` folder and measured in bytes. Every measure is taken on a
  fresh parent with that saved overlay applied (`OverlayTable`), not on the trained model;
- LoRA at several ranks on the same texts, with the same steps and batch. Each method at its own
  learning rates: LoRA at retrofit_facts' 2e-3; rows at 2e-2 and 1e-1 (x5 for tables in
  EngramTrainer, the paper's recipe): at 2e-3 the rows of 10 facts moved too little to answer
  any (0.05 answered, K=10, one seed), at 2e-2 0.60, at 1e-1 0.95 (docs/LOG.md);
- measured: the counterfactual answered greedily (both forms), closed-book recall of 50
  untouched people of A, loss change and KL(parent || arm) per token on A's held-out texts
  (the overlay's parent is the adapted model, LoRA's the base Llama), and
  the bytes of the artifact (overlay folder; LoRA: its float32 parameters).
LoRA's recall and bytes between ranks are interpolated in log-bytes to compare at the
overlay's bytes (equal bytes) and at the overlay's recall (equal recall). Each (arm, K, seed)
is one JSON in OUT/runs/overlay_capacity/, so an interrupted run resumes.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..analysis.knowledge import answer_scores
from ..data.corpora import read_extra_records, read_records
from ..data.dataset import PreparedData
from ..data.synthetic_bios import Person, completion_prompt, qa_prompt
from ..data.tokenizer import special_ids
from ..durable import atomic_write_text
from .common import figure, spread, write_results
from .retrofit_facts import LAYERS, LORA_TARGETS, _Blocks, _args, _held_out, _pretrain_base, _recall


def _counterfactuals(people, who: list[int], seed: int = 0) -> list[tuple[Person, str]]:
    rng = np.random.default_rng(seed)
    cities = sorted({p["birth_city"] for p in people})
    out = []
    for i in who:
        person = Person(**people[i])
        k = cities.index(person.birth_city)
        out.append((person, cities[(k + 1 + int(rng.integers(len(cities) - 1))) % len(cities)]))
    return out


def _texts(facts) -> list[str]:
    return [t for person, city in facts for t in (f"{completion_prompt(person, 'birth_city')} {city}.",
                                                   f"{qa_prompt(person, 'birth_city')} {city}")]


def _answered(model, tokenizer, facts) -> float:
    prompts = [p for person, _ in facts
               for p in (completion_prompt(person, "birth_city"), qa_prompt(person, "birth_city"))]
    answers = [city for _, city in facts for _ in range(2)]
    return float(answer_scores(model, tokenizer, prompts, answers)[1].mean())


def _parent(base: Path, data: PreparedData, rows: int, seed: int):
    from transformers import LlamaForCausalLM

    from ..hf.retrofit import add_engram

    torch.manual_seed(seed)
    return add_engram(LlamaForCausalLM.from_pretrained(base), layers=LAYERS, tokenizer=data.tokenizer,
                      rows_per_head=rows, n_head_per_ngram=4, n_embed_per_ngram=64, table_init_std=0.0, seed=seed)


def _trained_parent(work: Path, base: Path, data: PreparedData, texts: list[str], *, rows: int, steps: int,
                    lr: float, seq_len: int, batch_size: int, log) -> Path:
    """The parent adapter trained on population A (its state saved once, reused)."""
    from safetensors.torch import save_file

    from ..hf.trainer import EngramTrainer

    path = work / "parent_adapter.safetensors"
    if path.is_file():
        return path
    model = _parent(base, data, rows, 0)
    log(f"training the parent's Engram adapter on population A ({steps} steps)")
    with tempfile.TemporaryDirectory() as scratch:
        EngramTrainer(model=model, args=_args(Path(scratch), steps, lr, 0, batch_size),
                      train_dataset=_Blocks(data.tokenizer, texts, seq_len, special_ids(data.tokenizer)["eos"])).train()
    work.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.engram_adapter.state_dict().items()}
    save_file(state, str(work / "parent_adapter.tmp"))
    (work / "parent_adapter.tmp").replace(path)
    return path


def _load_parent(base: Path, data: PreparedData, rows: int, adapter: Path):
    from safetensors.torch import load_file

    model = _parent(base, data, rows, 0)
    model.engram_adapter.load_state_dict(load_file(str(adapter)))
    return model


def _write_overlay(model, initial: dict[str, torch.Tensor], folder: Path) -> dict[str, Any]:
    """The rows the write moved from the parent's (`initial`), saved as an overlay folder."""
    from ..memory.overlay import Overlay, rows_sha256

    adapter = model.engram_adapter
    rows, before = {}, {}
    for layer, engram in adapter.engrams.items():
        weight = engram.table.weight.detach()
        moved = torch.nonzero((weight != initial[layer]).any(-1)).flatten()
        rows[int(layer)] = (moved, weight[moved].clone())
        before[int(layer)] = rows_sha256(initial[layer][moved])
    overlay = Overlay(adapter.hasher.layout.to_dict(), {"checkpoint": "overlay_capacity parent (zero tables)"},
                      rows, before, {"op": "write", "texts": "counterfactual birth cities"})
    overlay.save(folder)
    return {"changed_rows": overlay.changed_rows, "rows_bytes": (folder / "overlay.safetensors").stat().st_size,
            "folder_bytes": sum(f.stat().st_size for f in folder.iterdir())}


def _apply_saved(parent, folder: Path):
    """A fresh parent with the saved overlay over its tables (what a server would serve)."""
    from ..memory.overlay import Overlay, OverlayTable, check_overlay

    overlay = Overlay.load(folder)
    adapter = parent.engram_adapter
    tables = {int(layer): e.table for layer, e in adapter.engrams.items()}
    check_overlay(overlay, adapter.hasher.layout, tables)
    for layer, (rows, values) in overlay.rows.items():
        adapter.engrams[str(layer)].table = OverlayTable(tables[layer], rows, values)
    return parent


def _one_run(path: Path, base: Path, parent: Path, arm: str, data: PreparedData, people, probes, facts, split, *,
             seed: int,
             rank: int, steps: int, lr: float, rows: int, seq_len: int, batch_size: int, log) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import LlamaForCausalLM, Trainer

    from ..hf.trainer import EngramTrainer

    eos = special_ids(data.tokenizer)["eos"]
    tok = data.tokenizer
    if arm == "overlay":
        model = _load_parent(base, data, rows, parent)
        initial = {layer: e.table.weight.detach().clone() for layer, e in model.engram_adapter.engrams.items()}
        for name, p in model.named_parameters():
            p.requires_grad_(".table." in name)
    else:
        import peft

        torch.manual_seed(seed)
        model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(base),
                                    peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS,
                                                    lora_dropout=0.0))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.perf_counter()
    texts = _texts(facts)
    train = _Blocks(tok, texts, seq_len, eos)
    while len(train) == 0:  # a few short facts fill no block: repeat them until they do
        texts = texts * 2
        train = _Blocks(tok, texts, seq_len, eos)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = (EngramTrainer if arm == "overlay" else Trainer)(
            model=model, args=_args(Path(scratch), steps, lr, seed, batch_size), train_dataset=train)
        trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    result: dict[str, Any] = {"arm": arm, "lr": lr, "rank": rank, "k": len(facts), "seed": seed,
                              "trainable_parameters": trainable,
                              "train_seconds": seconds, "write_texts": 2 * len(facts), "train_blocks": len(train)}
    if arm == "overlay":
        folder = path.parent / "overlays" / path.stem
        result.update(_write_overlay(model, initial, folder))
        model = _apply_saved(_load_parent(base, data, rows, parent), folder).eval()
        result["bytes"] = result["folder_bytes"]
    else:
        result["bytes"] = 4 * trainable
    base_model = (LlamaForCausalLM.from_pretrained(base) if arm == "lora"
                  else _load_parent(base, data, rows, parent)).eval()
    result.update({"answered": _answered(model, tok, facts),
                   "recall_untouched": _recall(model, tok, people, probes, split["untouched"]),
                   "held_out": _held_out(model, base_model, tok, split["held_out_texts"], seq_len, eos)})
    log(f"  {arm}{'' if arm == 'overlay' else f' r{rank}'} K={len(facts)} seed {seed}: "
        f"answered {result['answered']:.3f}, "
        f"untouched {result['recall_untouched']:.3f}, KL {result['held_out']['kl']:.4f}, "
        f"{result['bytes'] / 1e3:,.0f} kB ({seconds:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1))
    return result


def _interpolate(x: float, xs: list[float], ys: list[float]) -> float | None:
    """y at x along the polyline (xs increasing); None outside the measured range."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, ys))


def run_overlay_capacity(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), ks=(10, 30, 100, 300),
                         ranks=(2, 16, 64), steps: int = 150, base_steps: int = 1500, parent_steps: int = 300,
                         lr: float = 2e-3, overlay_lrs=(2e-2, 1e-1), rows_per_head: int = 2003, untouched: int = 50,
                         seq_len: int = 64, batch_size: int = 16, population_b: int = 100,
                         log=print) -> dict[str, Any]:
    """Train the parent's adapter (once), then write K facts with each arm over `seeds`.
    `population_b`: the last people, which retrofit_facts' base never saw (left out here too)."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    people, probes = read_extra_records(data_dir, "people"), read_extra_records(data_dir, "probes")
    docs, val = read_records(data_dir, "train"), read_records(data_dir, "val")
    first_b = len(people) - population_b  # retrofit_facts' population A (its base is shared)
    if max(ks) + untouched > first_b:
        raise ValueError(f"population A has {first_b} people: K up to {max(ks)} plus {untouched} untouched do not fit")
    order = np.random.default_rng(0).permutation(first_b).tolist()
    split = {"untouched": sorted(order[max(ks):max(ks) + untouched]),
             "held_out_texts": [d["text"] for d in val if d.get("person", -1) < first_b][:200]}
    base = _pretrain_base(out / "runs" / "retrofit_facts" / "base", data,
                          [d["text"] for d in docs if d.get("person", -1) < first_b],
                          steps=base_steps, seq_len=128, batch_size=batch_size, log=log)
    from transformers import LlamaForCausalLM

    work = out / "runs" / "overlay_capacity"
    parent = _trained_parent(work, base, data, [d["text"] for d in docs if d.get("person", -1) < first_b],
                             rows=rows_per_head, steps=parent_steps, lr=lr, seq_len=128, batch_size=batch_size, log=log)
    base_model = LlamaForCausalLM.from_pretrained(base).eval()
    parent_model = _load_parent(base, data, rows_per_head, parent).eval()
    all_facts = _counterfactuals(people, order[:max(ks)])
    results: dict[str, Any] = {
        "experiment": "overlay_capacity", "data": str(data_dir), "seeds": list(seeds), "ks": list(ks),
        "ranks": list(ranks), "overlay_lrs": list(overlay_lrs), "steps": steps, "parent_steps": parent_steps,
        "lr": lr, "batch_size": batch_size, "seq_len": seq_len,
        "rows_per_head": rows_per_head, "layers": LAYERS, "untouched_people": untouched,
        "base": {"answered_counterfactual": _answered(base_model, data.tokenizer, all_facts),
                 "recall_untouched": _recall(base_model, data.tokenizer, people, probes, split["untouched"])},
        "parent": {"answered_counterfactual": _answered(parent_model, data.tokenizer, all_facts),
                   "recall_untouched": _recall(parent_model, data.tokenizer, people, probes, split["untouched"]),
                   "held_out_vs_base": _held_out(parent_model, base_model, data.tokenizer, split["held_out_texts"], 128,
                                                 special_ids(data.tokenizer)["eos"])},
        "cells": {}}
    arms = [(f"overlay_lr{a:g}", "overlay", 0, a) for a in overlay_lrs] + [(f"lora_r{r}", "lora", r, lr) for r in ranks]
    for k in ks:
        facts = all_facts[:k]
        for name, arm, rank, arm_lr in arms:
            runs = [_one_run(work / f"{name}_k{k}_seed{s}.json", base, parent, arm, data, people, probes, facts, split,
                             seed=s, rank=rank, steps=steps, lr=arm_lr, rows=rows_per_head, seq_len=seq_len,
                             batch_size=batch_size, log=log) for s in seeds]
            results["cells"].setdefault(name, {})[str(k)] = {
                "by_seed": runs, "bytes": spread([r["bytes"] for r in runs]),
                "answered": spread([r["answered"] for r in runs]),
                "recall_untouched": spread([r["recall_untouched"] for r in runs]),
                "kl": spread([r["held_out"]["kl"] for r in runs]),
                "loss_change": spread([r["held_out"]["loss_change"] for r in runs])}
    results["compare"] = _compare(results)
    write_results(out, results, _plot)
    return results


def _compare(results: dict[str, Any]) -> dict[str, Any]:
    """Per overlay arm and K: LoRA at the overlay's bytes, and the bytes LoRA needs for the
    overlay's recall (with LoRA's KL there)."""
    out = {}
    lora = sorted((c for c in results["cells"] if c.startswith("lora")), key=lambda c: int(c.split("_r")[1]))
    for name, k in [(n, str(k)) for n in results["cells"] if n.startswith("overlay") for k in results["ks"]]:
        ov = results["cells"][name][k]
        by = [(results["cells"][c][k]["bytes"]["mean"], results["cells"][c][k]["answered"]["mean"],
               results["cells"][c][k]["kl"]["mean"]) for c in lora]
        xs = [float(np.log(b)) for b, _, _ in by]
        at_bytes = _interpolate(float(np.log(ov["bytes"]["mean"])), xs, [a for _, a, _ in by])
        kl_at_bytes = _interpolate(float(np.log(ov["bytes"]["mean"])), xs, [kl for _, _, kl in by])
        answered = [a for _, a, _ in by]
        bytes_for_recall = kl_for_recall = None
        if all(b >= a for a, b in zip(answered, answered[1:])):  # monotone in rank: invert
            x = _interpolate(ov["answered"]["mean"], answered, xs)
            bytes_for_recall = None if x is None else float(np.exp(x))
            kl_for_recall = _interpolate(ov["answered"]["mean"], answered, [kl for _, _, kl in by])
        out[f"{name} K={k}"] = {"overlay_bytes": ov["bytes"]["mean"], "overlay_answered": ov["answered"]["mean"],
                  "overlay_kl": ov["kl"]["mean"], "lora_answered_at_equal_bytes": at_bytes,
                  "lora_kl_at_equal_bytes": kl_at_bytes, "lora_bytes_at_equal_answered": bytes_for_recall,
                  "lora_kl_at_equal_answered": kl_for_recall,
                  "overlay_bytes_per_fact": ov["bytes"]["mean"] / int(k)}
    return out


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = figure((17, 3.8), ncols=4)
    ks = results["ks"]
    panels = [("answered", "counterfactual answered (greedy)"), ("recall_untouched", "untouched people: exact match"),
              ("kl", "KL(parent || arm) per token, held-out text"), ("bytes", "artifact bytes")]
    for ax, (key, title) in zip(axes, panels):
        for name, cells in results["cells"].items():
            means = [cells[str(k)][key]["mean"] for k in ks]
            stds = [cells[str(k)][key]["std"] for k in ks]
            ax.errorbar(ks, means, yerr=stds, marker="o", capsize=3, label=name,
                        lw=2 if name.startswith("overlay") else 1)
        if key == "recall_untouched":
            ax.axhline(results["base"]["recall_untouched"], color="k", ls="--", lw=0.8, label="base")
            ax.axhline(results["parent"]["recall_untouched"], color="#48c", ls=":", lw=0.8, label="overlay parent")
        ax.set_xscale("log")
        if key == "bytes":
            ax.set_yscale("log")
        ax.set_xlabel("facts written (K)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"K counterfactual facts written as an overlay (rows only, over an Engram adapter trained from zero "
                 f"tables) vs LoRA; {results['steps']} steps, {len(results['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    lines = [f"{who}: counterfactual answered {result[who]['answered_counterfactual']:.3f}, untouched recall "
             f"{result[who]['recall_untouched']:.3f}" for who in ("base", "parent")]
    for name, cells in result["cells"].items():
        for k, c in cells.items():
            lines.append(f"{name} K={k}: answered {c['answered']['mean']:.3f} ± {c['answered']['std']:.3f}; untouched "
                         f"{c['recall_untouched']['mean']:.3f}; KL {c['kl']['mean']:.4f}; loss change "
                         f"{c['loss_change']['mean']:+.4f}; {c['bytes']['mean'] / 1e3:,.0f} kB")
    for key, c in result["compare"].items():
        eq_b = c["lora_answered_at_equal_bytes"]
        eq_r, kl_r = c["lora_bytes_at_equal_answered"], c["lora_kl_at_equal_answered"]
        lines.append(f"{key}: overlay {c['overlay_bytes'] / 1e3:,.0f} kB "
                     f"({c['overlay_bytes_per_fact'] / 1e3:.1f} kB/fact), "
                     f"answered {c['overlay_answered']:.3f}; LoRA at equal bytes "
                     f"{'outside its ranks' if eq_b is None else f'{eq_b:.3f}'}; LoRA bytes for equal recall "
                     f"{'outside its ranks' if eq_r is None else f'{eq_r / 1e3:,.0f} kB'}"
                     f"{'' if kl_r is None else f' (KL {kl_r:.3f})'}")
    return lines


__all__ = ["run_overlay_capacity", "summary"]
