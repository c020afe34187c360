"""Engram against its peers at equal parameters: MoE and dense at the same total and active
parameters (`engram_vs_moe`), and the share of the sparse budget given to the memory (`rho_sweep`,
the paper's U-curve)."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..model.accounting import count_params
from ..model.planner import allocation, plan_sparsity
from ..data.dataset import PreparedData
from ..train.loop import TrainConfig
from .common import (REFERENCE_INIT, base_config, engram_changed, figure, init_label, init_suffix, paired,
                     preset_model, reference_init, row_reads, run_dir, seed_std, train_arm, write_results)


def dense_like(moe: ModelConfig) -> ModelConfig:
    """A dense model with the MoE model's active parameters: every MLP as wide as needed."""
    target = count_params(moe)["active"]
    base = dataclasses.replace(moe, moe=None, engram=None)
    per_width = 3 * moe.hidden_size * moe.n_layers
    fixed = count_params(dataclasses.replace(base, mlp_hidden_size=1))["active"] - per_width
    return dataclasses.replace(base, mlp_hidden_size=max(1, round((target - fixed) / per_width)))


def engram_vs_moe_configs(cfg: TrainConfig, data: PreparedData, rho: float = 0.75) -> dict[str, ModelConfig]:
    """Pure MoE (the preset), Engram at the same total and active parameters (the planner), and
    a dense model with the same active parameters."""
    with_engram = preset_model(cfg, data)
    moe = dataclasses.replace(with_engram, engram=None)
    planned = plan_sparsity(moe, rho, compressed_vocab_size=with_engram.engram.compressed_vocab_size,
                            pad_id=with_engram.engram.pad_id)
    return {"moe": moe, "engram": planned, "dense": dense_like(moe)}


def _arm_name(rho: float) -> str:
    return "moe" if rho == 1.0 else f"rho{rho:g}"


def run_engram_vs_moe(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 400,
                      preset: str = "tiny", rho: float = 0.75, table_init_std: float | None = None,
                      log=print) -> dict[str, Any]:
    """Train the three arms over seeds (resumable) and compare them paired by seed. A
    `table_init_std` other than the reference (REFERENCE_INIT, zero rows) adds the same Engram
    model with rows starting N(0, std^2), paired with the reference arm; results in
    engram_vs_moe_initSTD.json."""
    table_init_std = REFERENCE_INIT if table_init_std is None else table_init_std
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    base = base_config(preset, steps)
    configs = engram_vs_moe_configs(base, data, rho)
    dirs = {"moe": "moe", "engram": _arm_name(rho), "dense": "dense"}  # the rho sweep reuses these runs
    suffix = init_suffix(table_init_std)
    if suffix:
        configs["engram" + suffix] = engram_changed(configs["engram"], table_init_std=table_init_std)
        dirs["engram" + suffix] = dirs["engram"] + suffix
    counts = {k: count_params(c) for k, c in configs.items()}
    results: dict[str, Any] = {"experiment": "engram_vs_moe", "name": "engram_vs_moe" + suffix, "preset": preset,
                               "rho": rho, "table_init_std": table_init_std, "reference_init": REFERENCE_INIT,
                               "steps": steps, "seeds": list(seeds),
                               "data": str(data_dir),
                               "params": {k: {"total": v["total"], "active": v["active"], "engram": v["engram"]}
                                          for k, v in counts.items()},
                               "final_val_loss": {}, "curves": {}, "row_reads": {}}
    for name, config in configs.items():
        results["final_val_loss"][name], results["curves"][name] = train_arm(
            out, dirs[name], config, base, data_dir, seeds, log)
        if config.engram is not None:  # how many times training read the average used row (seed 0's batches)
            results["row_reads"][name] = row_reads(run_dir(out, dirs[name], steps, seeds[0]), base, data_dir, log)
    losses = results["final_val_loss"]
    results["summary"] = {name: {"mean": statistics.mean(v), "std": seed_std(v)} for name, v in losses.items()}
    # paired by seed (same data order and init seed): the seed-to-seed noise partly cancels
    results["paired_vs_moe"] = {name: paired(v, losses["moe"]) for name, v in losses.items() if name != "moe"}
    if suffix:
        results["init_vs_reference"] = paired(losses["engram" + suffix], losses["engram"])
    write_results(out, results, _plot)
    return results


def run_rho_sweep(out_dir: str | Path, data_dir: str | Path, *, rhos=(1 / 3, 0.5, 2 / 3, 5 / 6, 1.0),
                  seeds=(0, 1, 2), steps: int = 400, preset: str = "tiny", table_init_std: float | None = None,
                  log=print) -> dict[str, Any]:
    """Validation loss against rho at equal total and active parameters (the paper's U-curve).
    Rho moves in whole experts: the planner rounds it and we report the rho achieved. A
    `table_init_std` other than the reference init sweeps tables with rows starting N(0, std^2)
    beside the reference ones (each point paired with its twin); results in rho_sweep_initSTD.json."""
    ref = REFERENCE_INIT
    table_init_std = ref if table_init_std is None else table_init_std
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    base = base_config(preset, steps)
    arms = engram_vs_moe_configs(base, data, 0.5)
    moe, ct_cfg = arms["moe"], arms["engram"].engram
    planned = {rho: moe if rho == 1.0 else plan_sparsity(moe, rho, compressed_vocab_size=ct_cfg.compressed_vocab_size,
                                                          pad_id=ct_cfg.pad_id) for rho in rhos}
    points = []
    for std in sorted({ref, table_init_std}, key=lambda v: v != ref):  # the reference first
        for rho in rhos:
            if rho == 1.0 and std != ref:
                continue  # the MoE has no table
            config = moe if rho == 1.0 else engram_changed(planned[rho], table_init_std=std)
            achieved = 1.0 if rho == 1.0 else allocation(moe, config)["rho"]
            losses, _ = train_arm(out, _arm_name(round(rho, 4) if rho != 1.0 else 1.0) + init_suffix(std), config,
                                  base, data_dir, seeds, log)
            points.append({"rho_requested": rho, "rho": achieved, "table_init_std": std,
                           "experts": config.moe.n_routed_experts,
                           "table_params": count_params(config)["engram_tables_params"], "final_val_loss": losses,
                           "mean": statistics.mean(losses), "std": seed_std(losses)})
    moe_losses = next(p["final_val_loss"] for p in points if p["rho"] == 1.0) if 1.0 in rhos else None
    reference = {p["rho_requested"]: p["final_val_loss"] for p in points if p["table_init_std"] == ref}
    for p in points:
        p["paired_vs_moe"] = paired(p["final_val_loss"], moe_losses) if moe_losses else None
        if p["table_init_std"] != ref:
            p["paired_vs_reference_init"] = paired(p["final_val_loss"], reference[p["rho_requested"]])
    suffix = init_suffix(table_init_std)
    results = {"experiment": "rho_sweep", "name": "rho_sweep" + suffix, "preset": preset, "steps": steps,
               "table_init_std": table_init_std, "reference_init": ref, "seeds": list(seeds), "points": points,
               "rho_to_final_val_loss": {f"{p['rho']:.4f}{init_suffix(p['table_init_std'])}": p["mean"]
                                         for p in points}}
    write_results(out, results, _plot_rho)
    return results


def _plot_rho(results: dict[str, Any], path: Path) -> None:
    fig, ax = figure((5.5, 3.8))
    pts = sorted(results["points"], key=lambda p: p["rho"])
    ref = reference_init(results)
    stds = sorted({p.get("table_init_std", 1.0) for p in pts}, key=lambda v: v != ref)
    for std in stds:  # one line per table init, each ending at the MoE (rho 1, no table)
        line = [p for p in pts if p["rho"] == 1.0 or p.get("table_init_std", 1.0) == std]
        ax.errorbar([p["rho"] for p in line], [p["mean"] for p in line], yerr=[p["std"] for p in line], fmt="o-",
                    capsize=3, label=init_label(std) if len(stds) > 1 else None)
    for p in pts:
        if p.get("table_init_std", 1.0) == ref:
            ax.annotate(f"{p['experts']} experts", (p["rho"], p["mean"]), fontsize=7, textcoords="offset points",
                        xytext=(4, 6))
    ax.set_xlabel("rho (share of the inactive budget in routed experts; 1 = pure MoE)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"sparsity allocation, {results['preset']}, {results['steps']} steps, {len(results['seeds'])} seeds")
    ax.grid(alpha=0.3)
    if len(stds) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _plot(results: dict[str, Any], path: Path) -> None:
    fig, ax = figure((7, 4))
    for name, curves in results["curves"].items():
        steps = [s for s, _ in curves[0]]
        mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
        s = results["summary"][name]
        p = results["params"][name]
        ax.plot(steps, mean, "o-", ms=3, label=f"{name}: {s['mean']:.3f} ± {s['std']:.3f} "
                f"(total {p['total'] / 1e6:.2f}M, active {p['active'] / 1e6:.2f}M)")
        for c in curves:
            ax.plot([x for x, _ in c], [y for _, y in c], lw=0.5, alpha=0.4, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Engram vs MoE vs dense, {results['preset']}, {results['steps']} steps, "
                 f"{len(results['seeds'])} seeds, rho={results['rho']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    """Human lines of an engram_vs_moe or rho_sweep result."""
    lines, ref = [], reference_init(result)
    if result["experiment"] == "engram_vs_moe":
        for arm, s in result["summary"].items():
            p = result["params"][arm]
            d = result.get("paired_vs_moe", {}).get(arm)
            vs = f", {d['mean']:+.4f} ± {d['std']:.4f} vs moe (paired)" if d else ""
            reads = result.get("row_reads", {}).get(arm)
            rr = (", reads per used row " + "/".join(f"{r['reads_per_used_row']:.1f}" for r in reads.values())
                  if reads else "")
            lines.append(f"{arm:12s} final val loss {s['mean']:.4f} ± {s['std']:.4f} over {len(result['seeds'])} "
                         f"seeds{vs} (total {p['total']:,}, active {p['active']:,}){rr}")
        d = result.get("init_vs_reference", result.get("init_vs_normal"))
        if d:
            lines.append(f"engram{init_suffix(result['table_init_std'], ref)} ({init_label(result['table_init_std'])})"
                         f" minus engram ({init_label(ref)}), paired: {d['mean']:+.4f} ± {d['std']:.4f}")
    else:
        for p in result["points"]:
            std = p.get("table_init_std", 1.0)
            d = p.get("paired_vs_reference_init", p.get("paired_vs_normal_init"))
            lines.append(f"rho {p['rho']:.3f} ({p['experts']} experts, tables {p['table_params']:,}"
                         f"{'' if std == ref else ', ' + init_label(std)}): final val loss {p['mean']:.4f} ± "
                         f"{p['std']:.4f}" + (f", {d['mean']:+.4f} ± {d['std']:.4f} vs {init_label(ref)}" if d
                                              else ""))
    return lines
