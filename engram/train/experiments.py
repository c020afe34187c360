"""Small-scale experiments behind `engram experiment NAME`: several runs, seeds, one summary.

Each run trains into its own folder `out_dir/runs/ARM_STEPSsteps_seedS/` and is skipped when it already
finished (its summary.json exists) or resumed from its newest checkpoint otherwise, so an
interrupted experiment continues where it stopped. Results go to `out_dir/NAME.json` and a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..hashing.compression import CompressedTokenizer
from ..model.accounting import count_params
from ..model.planner import allocation, plan_sparsity
from .dataset import PreparedData
from .loop import TrainConfig, model_config_for, train
from .tokenizer import special_ids

EXPERIMENTS = ("engram_vs_moe", "rho_sweep", "ablations", "boundary_reset", "table_size", "knowledge_probes",
               "entity_gates")


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
                            pad_id=with_engram.engram.pad_id, sparse_grad=cfg.table_optimizer != "adam")
    return {"moe": moe, "engram": planned, "dense": dense_like(moe)}


def seed_std(values) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def run_dir(out: Path, name: str, steps: int, seed: int) -> Path:
    """Where one run of an arm lives: runs are shared between experiments by this name."""
    return out / "runs" / f"{name}_{steps}steps_seed{seed}"


def train_arm(out: Path, name: str, config: ModelConfig, base: TrainConfig, data_dir, seeds, log):
    """Final validation losses and eval curves of one arm over seeds (finished runs are reused)."""
    losses, curves = [], []
    for seed in seeds:
        folder = run_dir(out, name, base.max_steps, seed)
        summary_path = folder / "summary.json"
        if (folder / "run.json").is_file():  # a shared run must be of the same model
            saved = ModelConfig.from_dict(json.loads((folder / "run.json").read_text())["model"])
            if saved != config:
                raise ValueError(f"{folder} holds a run of another model than arm {name!r} asks for; "
                                 "move it away or use another --out folder")
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
        else:
            log(f"training {name}, seed {seed} -> {folder}")
            summary = train(folder, dataclasses.replace(base, seed=seed), data_dir=data_dir, resume=True,
                            model_config=config, log=log, progress=False)
        losses.append(summary["final_val_loss"])
        records = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
        curves.append([(r["step"], r["val_loss"]) for r in records if r["kind"] == "eval"])
    return losses, curves


def base_config(preset: str, steps: int) -> TrainConfig:
    return TrainConfig(preset=preset, max_steps=steps, eval_every=max(1, steps // 4), checkpoint_every=steps,
                       table_optimizer="sparse_adam", sample_prompt="")


def _arm_name(rho: float) -> str:
    return "moe" if rho == 1.0 else f"rho{rho:g}"


def run_engram_vs_moe(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 400,
                      preset: str = "tiny", rho: float = 0.75, log=print) -> dict[str, Any]:
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    base = base_config(preset, steps)
    configs = engram_vs_moe_configs(base, data, rho)
    counts = {k: count_params(c) for k, c in configs.items()}
    results: dict[str, Any] = {"experiment": "engram_vs_moe", "preset": preset, "rho": rho, "steps": steps,
                               "seeds": list(seeds), "data": str(data_dir),
                               "params": {k: {"total": v["total"], "active": v["active"], "engram": v["engram"]}
                                          for k, v in counts.items()},
                               "final_val_loss": {}, "curves": {}}
    dirs = {"moe": "moe", "engram": _arm_name(rho), "dense": "dense"}  # the rho sweep reuses these runs
    for name, config in configs.items():
        results["final_val_loss"][name], results["curves"][name] = train_arm(
            out, dirs[name], config, base, data_dir, seeds, log)
    results["summary"] = {name: {"mean": statistics.mean(v), "std": seed_std(v)}
                          for name, v in results["final_val_loss"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "engram_vs_moe.json").write_text(json.dumps(results, indent=1))
    _plot(results, out / "engram_vs_moe.png")
    return results


def run_rho_sweep(out_dir: str | Path, data_dir: str | Path, *, rhos=(1 / 3, 0.5, 2 / 3, 5 / 6, 1.0),
                  seeds=(0, 1, 2), steps: int = 400, preset: str = "tiny", log=print) -> dict[str, Any]:
    """Validation loss against rho at equal total and active parameters (the paper's U-curve).
    Rho moves in whole experts: the planner rounds it and we report the rho achieved."""
    out = Path(out_dir)
    data = PreparedData.open(data_dir)
    base = base_config(preset, steps)
    arms = engram_vs_moe_configs(base, data, 0.5)
    moe, ct_cfg = arms["moe"], arms["engram"].engram
    points = []
    for rho in rhos:
        config = moe if rho == 1.0 else plan_sparsity(moe, rho, compressed_vocab_size=ct_cfg.compressed_vocab_size,
                                                      pad_id=ct_cfg.pad_id, sparse_grad=True)
        achieved = 1.0 if rho == 1.0 else allocation(moe, config)["rho"]
        losses, _ = train_arm(out, _arm_name(round(rho, 4) if rho != 1.0 else 1.0), config, base, data_dir,
                               seeds, log)
        points.append({"rho_requested": rho, "rho": achieved, "experts": config.moe.n_routed_experts,
                       "table_params": count_params(config)["engram_tables_params"], "final_val_loss": losses,
                       "mean": statistics.mean(losses), "std": seed_std(losses)})
    results = {"experiment": "rho_sweep", "preset": preset, "steps": steps, "seeds": list(seeds), "points": points,
               "rho_to_final_val_loss": {f"{p['rho']:.4f}": p["mean"] for p in points}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "rho_sweep.json").write_text(json.dumps(results, indent=1))
    _plot_rho(results, out / "rho_sweep.png")
    return results


def preset_model(base: TrainConfig, data: PreparedData) -> ModelConfig:
    """The preset with Engram, sized to the dataset's tokenizer (what `engram train` builds)."""
    return model_config_for(base, data, CompressedTokenizer.from_tokenizer(data.tokenizer))


def engram_changed(config: ModelConfig, **engram_changes) -> ModelConfig:
    """`config` with some Engram fields changed. Width and streams are the model's: change
    `hidden_size` / `n_branches` on the ModelConfig (`dataclasses.replace(config, n_branches=4)`)."""
    model_fields = sorted({"hidden_size", "n_branches"} & set(engram_changes))
    if model_fields:
        raise ValueError(f"engram_changed: {model_fields} belong to the model, not its Engram config; "
                         f"use dataclasses.replace(config, {model_fields[0]}=...)")
    return dataclasses.replace(config, engram=dataclasses.replace(config.engram, **engram_changes))


def ablation_configs(base: TrainConfig, data: PreparedData) -> dict[str, ModelConfig]:
    """One backbone (the preset), one change per arm. `no_compression` hashes raw token ids;
    `capacity_1` gives every n-gram the same row per head (the memory can store nothing
    n-gram specific); `layer_K` moves the Engram layer to 0-based block K."""
    full = preset_model(base, data)
    vocab, raw_pad = full.vocab_size, special_ids(data.tokenizer)["pad"] or 0
    arms = {"full": full, "no_engram": dataclasses.replace(full, engram=None),
            "no_gate": engram_changed(full, use_gate=False),
            "no_short_conv": engram_changed(full, use_short_conv=False),
            "no_compression": engram_changed(full, compressed_vocab_size=vocab, pad_id=raw_pad),
            "capacity_1": engram_changed(full, single_row=True),
            "doc_reset": engram_changed(full, reset_id=_compressed_eos(data))}
    for layer in range(full.n_layers):
        if (layer,) != full.engram.layer_ids:
            arms[f"layer_{layer}"] = engram_changed(full, layer_ids=(layer,))
    other_m = 4 if full.n_branches == 1 else 1
    arms[f"m{other_m}"] = dataclasses.replace(full, n_branches=other_m)  # Engram follows the streams
    arms[f"m{other_m}_no_engram"] = dataclasses.replace(arms[f"m{other_m}"], engram=None)
    return arms


def _compressed_eos(data: PreparedData) -> int:
    """The compressed id of the tokenizer's end-of-document token (the training files put one
    after every document)."""
    from ..hashing.compression import CompressedTokenizer

    eos = special_ids(data.tokenizer)["eos"]
    if eos is None:
        raise ValueError(f"{data.root}'s tokenizer has no end-of-document token to reset n-grams at")
    return int(CompressedTokenizer.from_tokenizer(data.tokenizer).lookup_table[eos])


def _run_arms(out: Path, experiment: str, arms: dict[str, ModelConfig], base: TrainConfig, data_dir, seeds,
              log, run_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Train every arm over seeds; per arm: parameters, final losses by seed, mean and spread."""
    results: dict[str, Any] = {"experiment": experiment, "preset": base.preset, "steps": base.max_steps,
                               "seeds": list(seeds), "data": str(data_dir), "arms": {}}
    for name, config in arms.items():
        run_name = (run_names or {}).get(name, name)
        losses, curves = train_arm(out, run_name, config, base, data_dir, seeds, log)
        p = count_params(config)
        results["arms"][name] = {
            "final_val_loss": losses, "mean": statistics.mean(losses),
            "train_seconds": [_train_seconds(run_dir(out, run_name, base.max_steps, s), base) for s in seeds],
            "std": seed_std(losses),
            "params": {"total": p["total"], "active": p["active"], "engram": p["engram"],
                       "table_rows": p["engram_tables_params"] // config.engram.head_dim if config.engram else 0}}
    return results


def _train_seconds(folder: Path, base: TrainConfig) -> float:
    """Time spent in training steps (evaluation left out), from the run's per-step metrics."""
    tokens = base.batch_size * base.seq_len
    records = (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())
    return sum(tokens / r["tokens_per_s"] for r in records if r["kind"] == "train")


# Run folders shared with engram_vs_moe: its "moe" arm is the preset without Engram.
SHARED_RUNS = {"no_engram": "moe"}


def run_ablations(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 400,
                  preset: str = "tiny", log=print) -> dict[str, Any]:
    """Each arm changes one thing of the preset's Engram model; the deltas are against `full`."""
    out = Path(out_dir)
    base = base_config(preset, steps)
    arms = ablation_configs(base, PreparedData.open(data_dir))
    results = _run_arms(out, "ablations", arms, base, data_dir, seeds, log, run_names=SHARED_RUNS)
    full = results["arms"]["full"]
    for arm in results["arms"].values():
        arm["delta_vs_full"] = arm["mean"] - full["mean"]
        # paired by seed: same data order and init seed, so the seed-to-seed noise partly cancels
        diffs = [a - b for a, b in zip(arm["final_val_loss"], full["final_val_loss"])]
        arm["paired_delta_std"] = seed_std(diffs)
    write_results(out, results, _plot_ablations)
    return results


def run_boundary_reset(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 400,
                       preset: str = "tiny", log=print) -> dict[str, Any]:
    """Packed training windows hold several documents: n-grams reset at each document's end
    (`doc_reset`, as transformers' Qwen4Exp does) against n-grams that run across them (`full`,
    the paper's demo). Two arms of `ablations`, run on their own."""
    out = Path(out_dir)
    base = base_config(preset, steps)
    arms = ablation_configs(base, PreparedData.open(data_dir))
    results = _run_arms(out, "boundary_reset", {k: arms[k] for k in ("full", "doc_reset")}, base, data_dir, seeds,
                        log)
    full = results["arms"]["full"]
    for arm in results["arms"].values():
        arm["delta_vs_full"] = arm["mean"] - full["mean"]
        arm["paired_delta_std"] = seed_std([a - b for a, b in zip(arm["final_val_loss"], full["final_val_loss"])])
    write_results(out, results, _plot_ablations)
    return results


def run_table_size(out_dir: str | Path, data_dir: str | Path, *, rows_per_head=(512, 2048, 8192, 32768, 131072,
                   524288), seeds=(0, 1, 2), steps: int = 400, preset: str = "tiny", log=print) -> dict[str, Any]:
    """Loss against table slots at a fixed backbone (only `vocab_size_per_ngram` changes); the
    backbone without Engram and the capacity-1 table are the two reference lines."""
    out = Path(out_dir)
    base = base_config(preset, steps)
    data = PreparedData.open(data_dir)
    full = preset_model(base, data)
    orders = full.engram.max_ngram_size - 1
    arms = {f"rows{r}": engram_changed(full, vocab_size_per_ngram=(r,) * orders) for r in rows_per_head}
    arms["capacity_1"] = engram_changed(full, single_row=True)
    arms["no_engram"] = dataclasses.replace(full, engram=None)
    names = dict(SHARED_RUNS)
    names.update({f"rows{r}": "full" for r in rows_per_head if (r,) * orders == full.engram.vocab_size_per_ngram})
    results = _run_arms(out, "table_size", arms, base, data_dir, seeds, log, run_names=names)
    results["slots_to_final_val_loss"] = {str(a["params"]["table_rows"]): a["mean"]
                                          for n, a in results["arms"].items() if n.startswith("rows")}
    write_results(out, results, _plot_table_size)
    return results


def write_results(out: Path, results: dict[str, Any], plot) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{results['experiment']}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{results['experiment']}.png")


def figure(size, ncols: int = 1):
    """A figure off any display, with one axis (or a list of `ncols` side by side)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes[0] if ncols == 1 else axes


def _plot_ablations(results: dict[str, Any], path: Path) -> None:
    arms = results["arms"]
    names = sorted(arms, key=lambda n: arms[n]["mean"])
    fig, ax = figure((6.5, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [arms[n]["delta_vs_full"] for n in names],
            xerr=[arms[n]["paired_delta_std"] for n in names], capsize=3,
            color=["tab:gray" if n == "full" else "tab:blue" for n in names])
    ax.set_yticks(range(len(names)), [f"{n} ({arms[n]['mean']:.3f})" for n in names], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("val loss minus full Engram (nats; bars: spread of paired differences)", fontsize=8)
    ax.set_title(f"ablations, {results['preset']}, {results['steps']} steps, {len(results['seeds'])} seeds",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _plot_table_size(results: dict[str, Any], path: Path) -> None:
    arms = results["arms"]
    pts = sorted((a["params"]["table_rows"], a["mean"], a["std"]) for n, a in arms.items() if n.startswith("rows"))
    fig, ax = figure((6, 4))
    ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt="o-", capsize=3,
                label="Engram, table slots per layer")
    for name, style in (("no_engram", "k--"), ("capacity_1", "r:")):
        a = arms[name]
        ax.axhline(a["mean"], color=style[0], ls=style[1:], label=f"{name}: {a['mean']:.3f} ± {a['std']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("table slots (rows over all hash heads of the Engram layer)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"table size at a fixed backbone, {results['preset']}, {len(results['seeds'])} seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def _plot_rho(results: dict[str, Any], path: Path) -> None:
    fig, ax = figure((5.5, 3.8))
    pts = sorted(results["points"], key=lambda p: p["rho"])
    ax.errorbar([p["rho"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts], fmt="o-", capsize=3)
    for p in pts:
        ax.annotate(f"{p['experts']} experts", (p["rho"], p["mean"]), fontsize=7, textcoords="offset points",
                    xytext=(4, 6))
    ax.set_xlabel("rho (share of the inactive budget in routed experts; 1 = pure MoE)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"sparsity allocation, {results['preset']}, {len(results['seeds'])} seeds")
    ax.grid(alpha=0.3)
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
    ax.set_title(f"Engram vs MoE vs dense, {results['preset']}, {len(results['seeds'])} seeds, rho={results['rho']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
