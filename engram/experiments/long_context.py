"""Long-context retrieval: Engram against the MoE at equal total and active parameters, trained
on a mixture of multi-query needle-in-a-haystack and variable tracking (`engram data build
--corpus long-context`), probed by exact match against context length (paper Table 2: the claim is
that a memory that takes over local patterns frees attention for the long range).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.knowledge import answer_scores
from ..model.accounting import count_params
from ..model.planner import plan_sparsity
from ..data.corpora import read_extra_records
from ..data.dataset import PreparedData
from .common import (base_config, cached_json, figure, newest_model, paired, preset_model, run_dir, spread,
                     train_arm, write_results)


def long_context_configs(base, data: PreparedData, *, rho: float = 0.75, max_seq_len: int = 1536):
    """moe (the preset without Engram, positions up to `max_seq_len`) and engram (planned to the
    same total and active parameters)."""
    full = dataclasses.replace(preset_model(base, data), max_seq_len=max_seq_len)
    moe = dataclasses.replace(full, engram=None)
    planned = plan_sparsity(moe, rho, compressed_vocab_size=full.engram.compressed_vocab_size,
                            pad_id=full.engram.pad_id)
    return {"moe": moe, "engram": planned}


def _scores(folder: Path, data: PreparedData, probes: list[dict], log) -> dict[str, Any]:
    """Exact match and the answer's loss in nats per token (a graded signal where exact match
    is 0), per (task, target length) of one run (cached in long_context.json)."""
    def compute():
        logprob, greedy = answer_scores(newest_model(folder, log), data.tokenizer, [p["prompt"] for p in probes],
                                        [p["answer"] for p in probes], batch_size=8)
        cells: dict[str, dict[str, list]] = {}
        for lp, hit, p in zip(logprob, greedy, probes):
            cell = cells.setdefault(f"{p['task']}@{p['target_tokens']}", {"hits": [], "tokens": [], "nats": []})
            cell["hits"].append(hit)
            cell["tokens"].append(len(data.tokenizer.encode(p["prompt"]).ids))
            cell["nats"].append(-lp / len(data.tokenizer.encode(" " + p["answer"], add_special_tokens=False).ids))
        return {k: {"exact_match": float(np.mean(c["hits"])), "answer_nats_per_token": float(np.mean(c["nats"])),
                    "n": len(c["hits"]), "mean_prompt_tokens": float(np.mean(c["tokens"]))}
                for k, c in sorted(cells.items(), key=lambda kv: (kv[0].split("@")[0], int(kv[0].split("@")[1])))}

    return cached_json(folder / "long_context.json", compute,
                       reuse=lambda cached: all("answer_nats_per_token" in c for c in cached.values()))


def run_long_context(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 600,
                     preset: str = "tiny", seq_len: int = 1024, batch_size: int = 4, rho: float = 0.75,
                     log=print) -> dict[str, Any]:
    """Train both arms over seeds on the long-context mixture (resumable) and probe them."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    probes = read_extra_records(data_dir, "probes")
    base = dataclasses.replace(base_config(preset, steps), seq_len=seq_len, batch_size=batch_size)
    arms = long_context_configs(base, data, rho=rho, max_seq_len=max(1536, seq_len))
    results: dict[str, Any] = {"experiment": "long_context", "preset": preset, "steps": steps, "seeds": list(seeds),
                               "seq_len": seq_len, "batch_size": batch_size, "data": str(data_dir),
                               "probes": len(probes), "arms": {}}
    for name, config in arms.items():
        run_name = f"long_context_{name}_len{seq_len}"
        losses, _ = train_arm(out, run_name, config, base, data_dir, seeds, log)
        per_seed = [_scores(run_dir(out, run_name, steps, s), data, probes, log) for s in seeds]
        p = count_params(config)
        results["arms"][name] = {
            "params": {"total": p["total"], "active": p["active"], "engram": p["engram"]},
            "final_val_loss": losses,
            "cells": {cell: {**spread([r[cell]["exact_match"] for r in per_seed]), "n": per_seed[0][cell]["n"],
                             "answer_nats_per_token": spread([r[cell]["answer_nats_per_token"] for r in per_seed]),
                             "mean_prompt_tokens": per_seed[0][cell]["mean_prompt_tokens"]}
                      for cell in per_seed[0]}}
    moe = results["arms"]["moe"]["cells"]
    for cell, c in results["arms"]["engram"]["cells"].items():
        c["minus_moe"] = paired(c["by_seed"], moe[cell]["by_seed"])
        c["answer_nats_minus_moe"] = paired(c["answer_nats_per_token"]["by_seed"],
                                            moe[cell]["answer_nats_per_token"]["by_seed"])
    write_results(out, results, _plot)
    return results


def _plot(results: dict[str, Any], path: Path) -> None:
    """Per task: exact match, and the answer's loss per token, against prompt length."""
    tasks = sorted({cell.split("@")[0] for arm in results["arms"].values() for cell in arm["cells"]})
    fig, axes = figure((4.5 * 2 * len(tasks), 3.8), ncols=2 * len(tasks))
    axes = axes if isinstance(axes, list) else [axes]
    for i, task in enumerate(tasks):
        for ax, what in zip(axes[2 * i:2 * i + 2], ("exact match", "answer nats per token")):
            for name, arm in results["arms"].items():
                cells = sorted((c["mean_prompt_tokens"], c) for k, c in arm["cells"].items()
                               if k.startswith(task + "@"))
                m = [c if what == "exact match" else c.get("answer_nats_per_token", {}) for _, c in cells]
                if not all("mean" in v for v in m):
                    continue
                ax.errorbar([t for t, _ in cells], [v["mean"] for v in m], yerr=[v["std"] for v in m], fmt="o-",
                            capsize=3, label=f"{name} ({arm['params']['active'] / 1e6:.2f}M active)")
            ax.set_xlabel("prompt length (tokens)")
            ax.set_ylabel(what)
            if what == "exact match":
                ax.set_ylim(-0.05, 1.05)
            ax.set_title(f"{task}, {results['steps']} steps, {len(results['seeds'])} seeds", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    """Human lines of a long_context result."""
    lines = []
    for name, arm in result["arms"].items():
        cells = "  ".join(f"{k} {c['mean']:.3f}±{c['std']:.3f}" for k, c in arm["cells"].items())
        lines.append(f"{name:7s} exact match: {cells}")
        nats = "  ".join(f"{k} {c['answer_nats_per_token']['mean']:.3f}" for k, c in arm["cells"].items()
                         if "answer_nats_per_token" in c)
        lines.append(f"{name:7s} answer nats per token: {nats}")
    return lines
