"""What every experiment shares: arms trained over seeds into resumable run folders, the
preset model, seed statistics, and results written as JSON + PNG.

Each run trains into its own folder `out_dir/runs/ARM_STEPSsteps_seedS/` and is skipped when it
already finished (its summary.json exists) or resumed from its newest checkpoint otherwise, so an
interrupted experiment continues where it stopped. Results go to `out_dir/NAME.json` and a PNG.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from ..analysis.table_stats import training_row_reads
from ..config import EngramConfig, ModelConfig
from ..hashing.compression import CompressedTokenizer
from ..model.accounting import count_params
from ..runs import is_run, load_checkpoint, newest_checkpoint, read_run
from ..data.dataset import PreparedData
from ..train.loop import TrainConfig, model_config_for, train
from ..data.tokenizer import special_ids


def seed_std(values) -> float:
    """Sample standard deviation over seeds (0 for a single seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def spread(values: list[float]) -> dict[str, Any]:
    """A measure over seeds: by seed, mean and sample std."""
    return {"by_seed": list(values), "mean": statistics.mean(values), "std": seed_std(values)}


def paired(values, reference) -> dict[str, Any]:
    """Differences to a reference arm paired by seed (same data order and init seed, so the
    seed-to-seed noise partly cancels)."""
    return spread([a - b for a, b in zip(values, reference)])


def run_dir(out: Path, name: str, steps: int, seed: int) -> Path:
    """Where one run of an arm lives: runs are shared between experiments by this name."""
    return out / "runs" / f"{name}_{steps}steps_seed{seed}"


def train_arm(out: Path, name: str, config: ModelConfig, base: TrainConfig, data_dir, seeds, log):
    """Final validation losses and eval curves of one arm over seeds (finished runs are reused)."""
    losses, curves = [], []
    data = PreparedData.open(data_dir).fingerprint()
    for seed in seeds:
        folder = run_dir(out, name, base.max_steps, seed)
        summary_path = folder / "summary.json"
        if is_run(folder):  # a shared run must be of the same model, on the same data
            run = read_run(folder)
            if ModelConfig.from_dict(run["model"]) != config:
                raise ValueError(f"{folder} holds a run of another model than arm {name!r} asks for; "
                                 "move it away or use another --out folder")
            if run.get("data") != data:
                raise ValueError(f"{folder} was trained on other data ({run.get('data_dir')}) than {data_dir}; "
                                 "pass that --data, or use another --out folder")
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


def preset_model(base: TrainConfig, data: PreparedData) -> ModelConfig:
    """The preset with Engram, sized to the dataset's tokenizer (what `engram train` builds)."""
    return model_config_for(base, data, CompressedTokenizer.from_tokenizer(data.tokenizer))


def engram_changed(config: ModelConfig, **engram_changes) -> ModelConfig:
    """`config` with some Engram fields changed. Width and streams are the model's: change
    `hidden_size` / `n_streams` on the ModelConfig (`dataclasses.replace(config, n_streams=4)`)."""
    model_fields = sorted({"hidden_size", "n_streams"} & set(engram_changes))
    if model_fields:
        raise ValueError(f"engram_changed: {model_fields} belong to the model, not its Engram config; "
                         f"use dataclasses.replace(config, {model_fields[0]}=...)")
    return dataclasses.replace(config, engram=dataclasses.replace(config.engram, **engram_changes))


# The init every arm's tables start at unless an experiment is told otherwise: the library's
# default for new models (rows at zero). Results record it as `reference_init`; result files
# from before it was recorded used N(0, 1).
REFERENCE_INIT: float = EngramConfig.__dataclass_fields__["table_init_std"].default


def reference_init(results: dict[str, Any]) -> float:
    """The reference init of a results dict (old files: N(0, 1))."""
    return results.get("reference_init", 1.0)


def init_suffix(table_init_std: float, reference: float = REFERENCE_INIT) -> str:
    """The arm-name suffix of tables whose rows start N(0, std^2): none for the reference init."""
    return "" if table_init_std == reference else f"_init{table_init_std:g}"


def init_label(table_init_std: float) -> str:
    """How plots and summaries name a table init."""
    if table_init_std == 0:
        return "rows start at 0"
    return "rows N(0, 1)" if table_init_std == 1.0 else f"rows N(0, {table_init_std:g}²)"


def over_encoding(config: ModelConfig) -> ModelConfig:
    """The paper's other baseline (OverEncoding, Huang et al. 2025): the same hashed n-gram
    tables, read at the input and added to the token embedding, with no context gate and no
    short conv. Here: Engram at block 0 (before its attention, i.e. on the embedding) with
    `use_gate=False, use_short_conv=False`; the concatenated heads are projected to the model
    width, as a sum of per-head projections."""
    return engram_changed(config, layer_ids=(0,), use_gate=False, use_short_conv=False)


def compressed_eos(data: PreparedData) -> int:
    """The compressed id of the tokenizer's end-of-document token (the training files put one
    after every document)."""
    from ..hashing.compression import CompressedTokenizer

    eos = special_ids(data.tokenizer)["eos"]
    if eos is None:
        raise ValueError(f"{data.root}'s tokenizer has no end-of-document token to reset n-grams at")
    return int(CompressedTokenizer.from_tokenizer(data.tokenizer).lookup_table[eos])


def run_arms(out: Path, experiment: str, arms: dict[str, ModelConfig], base: TrainConfig, data_dir, seeds,
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
            "row_reads": None if config.engram is None else row_reads(
                run_dir(out, run_name, base.max_steps, seeds[0]), base, data_dir, log),
            "train_seconds": [train_seconds(run_dir(out, run_name, base.max_steps, s), base) for s in seeds],
            "std": seed_std(losses),
            "params": {"total": p["total"], "active": p["active"], "engram": p["engram"],
                       "table_rows": p["engram_tables_params"] // config.engram.row_dim if config.engram else 0}}
    return results


def cached_json(path: Path, compute, reuse=lambda cached: True) -> Any:
    """A result derived from a finished run, kept beside it as JSON (written atomically) so a
    resumed experiment computes it once; `reuse(cached)` says whether a cached one still fits."""
    if path.is_file():
        cached = json.loads(path.read_text())
        if reuse(cached):
            return cached
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return result


def newest_model(folder: Path, log):
    """The model of a run's newest good checkpoint."""
    return load_checkpoint(newest_checkpoint(folder, warn=log))[0]


def row_reads(folder: Path, base: TrainConfig, data_dir, log) -> dict[str, Any]:
    """{layer: reads per used row, ...} of an Engram run's training (cached in row_reads.json).
    The batches are the run's own, replayed; the rows depend on the config only."""
    def compute():
        seed = read_run(folder)["train"]["seed"]
        reads = training_row_reads(newest_model(folder, log), PreparedData.open(data_dir).train,
                                   steps=base.max_steps, batch_size=base.batch_size, seq_len=base.seq_len, seed=seed)
        return {str(k): v for k, v in reads.items()}

    return cached_json(folder / "row_reads.json", compute)


def train_seconds(folder: Path, base: TrainConfig) -> float:
    """Time spent in training steps (evaluation left out), from the run's per-step metrics."""
    tokens = base.batch_size * base.seq_len
    records = (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())
    return sum(tokens / r["tokens_per_s"] for r in records if r["kind"] == "train")


# Run folders shared with engram_vs_moe: its "moe" arm is the preset without Engram.
SHARED_RUNS = {"no_engram": "moe"}


def write_results(out: Path, results: dict[str, Any], plot) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = results.get("name", results["experiment"])  # a variant of an experiment keeps its own files
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    plot(results, out / f"{name}.png")


def figure(size, ncols: int = 1):
    """A figure off any display, with one axis (or a list of `ncols` side by side)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes[0] if ncols == 1 else axes
