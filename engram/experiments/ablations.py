"""One change at a time to the preset's Engram model: the ablation arms, document-boundary
resets, and the table-size sweep at a fixed backbone."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..data.dataset import PreparedData
from ..train.loop import TrainConfig
from ..data.tokenizer import special_ids
from .common import (REFERENCE_INIT, SHARED_RUNS, base_config, compressed_eos, engram_changed, figure, init_label,
                     init_suffix, over_encoding, paired, preset_model, reference_init, run_arms, write_results)


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
            "doc_reset": engram_changed(full, reset_id=compressed_eos(data)),
            "over_encoding": over_encoding(full)}
    for layer in range(full.n_layers):
        if (layer,) != full.engram.layer_ids:
            arms[f"layer_{layer}"] = engram_changed(full, layer_ids=(layer,))
    other_m = 4 if full.n_streams == 1 else 1
    arms[f"m{other_m}"] = dataclasses.replace(full, n_streams=other_m)  # Engram follows the streams
    arms[f"m{other_m}_no_engram"] = dataclasses.replace(arms[f"m{other_m}"], engram=None)
    return arms


def _versus_full(results: dict[str, Any], reference: str = "full") -> dict[str, Any]:
    """Each arm's mean minus the `reference` arm's (the full Engram model), and the spread of
    their differences paired by seed."""
    full = results["arms"][reference]
    results["reference"] = reference
    for arm in results["arms"].values():
        arm["delta_vs_full"] = arm["mean"] - full["mean"]
        arm["paired_delta_std"] = paired(arm["final_val_loss"], full["final_val_loss"])["std"]
    return results


def run_ablations(out_dir: str | Path, data_dir: str | Path, *, seeds=(0, 1, 2), steps: int = 400,
                  preset: str = "tiny", arms=None, table_init_std: float | None = None,
                  log=print) -> dict[str, Any]:
    """Each arm changes one thing of the preset's Engram model; the deltas are against `full`.
    `arms` picks some of them (`full` among them); a `table_init_std` other than the reference
    init starts every arm's table rows N(0, std^2) (arm names end `_initSTD`, results in
    ablations_initSTD.json)."""
    table_init_std = REFERENCE_INIT if table_init_std is None else table_init_std
    out = Path(out_dir)
    base = base_config(preset, steps)
    configs = ablation_configs(base, PreparedData.open(data_dir))
    if arms is not None:
        unknown = sorted(set(arms) - set(configs))
        if unknown or "full" not in arms:
            raise ValueError(f"ablations: arms must include 'full' and come from {', '.join(configs)}; "
                             f"got {', '.join(arms)}")
        configs = {name: c for name, c in configs.items() if name in arms}
    suffix = init_suffix(table_init_std)
    if suffix:  # arms without a table (no_engram, m4_no_engram) are the same runs as before
        configs = {name + suffix if c.engram else name: engram_changed(c, table_init_std=table_init_std) if c.engram
                   else c for name, c in configs.items()}
    results = _versus_full(run_arms(out, "ablations", configs, base, data_dir, seeds, log, run_names=SHARED_RUNS),
                           "full" + suffix)
    results.update(name="ablations" + suffix, table_init_std=table_init_std, reference_init=REFERENCE_INIT)
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
    results = _versus_full(run_arms(out, "boundary_reset", {k: arms[k] for k in ("full", "doc_reset")}, base,
                                    data_dir, seeds, log))
    write_results(out, results, _plot_ablations)
    return results


def run_table_size(out_dir: str | Path, data_dir: str | Path, *, rows_per_head=(512, 2048, 8192, 32768, 131072,
                   524288), over_encoding_rows=None, table_init_std: float | None = None, seeds=(0, 1, 2),
                   steps: int = 400, preset: str = "tiny", log=print) -> dict[str, Any]:
    """Loss against table slots at a fixed backbone (only `rows_per_head` changes); the
    backbone without Engram and the capacity-1 table are the two reference lines. OverEncoding
    (the same tables added to the input embedding, no gate, no conv) is swept over
    `over_encoding_rows` (default: the same sizes; () for none), the paper's comparison.

    `table_init_std` other than the reference init (REFERENCE_INIT: rows at zero, so a row
    training never read adds no noise) sweeps tables whose rows start N(0, std^2) beside the
    reference arms of the same sizes, paired by seed; the results go to `table_size_init{std}.json`."""
    ref = REFERENCE_INIT
    table_init_std = ref if table_init_std is None else table_init_std
    out = Path(out_dir)
    base = base_config(preset, steps)
    data = PreparedData.open(data_dir)
    full = preset_model(base, data)
    orders = full.engram.max_ngram_size - 1
    oe_rows = rows_per_head if over_encoding_rows is None else over_encoding_rows
    suffix = init_suffix(table_init_std)
    arms, names = {}, dict(SHARED_RUNS)
    for std in sorted({ref, table_init_std}, key=lambda v: v != ref):  # the reference first
        for prefix, model, sizes in (("rows", full, rows_per_head), ("oe_rows", over_encoding(full), oe_rows)):
            for r in sizes:
                arms[f"{prefix}{r}{init_suffix(std)}"] = engram_changed(model, rows_per_head=(r,) * orders,
                                                                         table_init_std=std)
                if std == ref and (r,) * orders == full.engram.rows_per_head:
                    names[f"{prefix}{r}"] = "full" if prefix == "rows" else "over_encoding"  # the ablations' arms
    arms["capacity_1"] = engram_changed(full, single_row=True)
    arms["no_engram"] = dataclasses.replace(full, engram=None)
    results = run_arms(out, "table_size", arms, base, data_dir, seeds, log, run_names=names)
    results.update(table_init_std=table_init_std, reference_init=ref)
    results["slots_to_final_val_loss"] = {str(a["params"]["table_rows"]): a["mean"] for n, a in results["arms"].items()
                                          if _sweep_arm(n, "rows", suffix)}
    if suffix:  # each size: the other init minus the reference, paired by seed
        a = results["arms"]
        results["init_vs_reference"] = {n: paired(a[n + suffix]["final_val_loss"], a[n]["final_val_loss"])
                                     for n in a if n + suffix in a}
        results["name"] = f"table_size{suffix}"
    write_results(out, results, _plot_table_size)
    return results


def _sweep_arm(name: str, prefix: str, suffix: str) -> bool:
    """Whether `name` is a table_size arm of one line: PREFIX, a row count, SUFFIX (the init)."""
    return re.fullmatch(rf"{prefix}\d+{re.escape(suffix)}", name) is not None


def _plot_ablations(results: dict[str, Any], path: Path) -> None:
    arms = results["arms"]
    names = sorted(arms, key=lambda n: arms[n]["mean"])
    fig, ax = figure((6.5, 0.35 * len(names) + 1.5))
    ax.barh(range(len(names)), [arms[n]["delta_vs_full"] for n in names],
            xerr=[arms[n]["paired_delta_std"] for n in names], capsize=3,
            color=["tab:gray" if n == results.get("reference", "full") else "tab:blue" for n in names])
    ax.set_yticks(range(len(names)), [f"{n} ({arms[n]['mean']:.3f})" for n in names], fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("val loss minus full Engram (nats; bars: spread of paired differences)", fontsize=8)
    std = results.get("table_init_std", 1.0)
    init = "" if std == reference_init(results) else ", " + init_label(std)
    ax.set_title(f"{results['experiment']}, {results['preset']}, {results['steps']} steps, "
                 f"{len(results['seeds'])} seeds{init}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def _plot_table_size(results: dict[str, Any], path: Path) -> None:
    arms = results["arms"]
    std, ref = results.get("table_init_std", 1.0), reference_init(results)
    fig, ax = figure((6, 4))
    inits = {"": ""} if std == ref else {"": ", " + init_label(ref), init_suffix(std, ref): ", " + init_label(std)}
    for prefix, name in (("rows", "Engram (gated, conv), layer of the preset"), ("oe_rows", "OverEncoding (input)")):
        for suffix, init in inits.items():
            pts = sorted((a["params"]["table_rows"], a["mean"], a["std"]) for n, a in arms.items()
                         if _sweep_arm(n, prefix, suffix))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                            fmt="s--" if suffix else "o-", capsize=3, label=name + init)
    for name, style in (("no_engram", "k--"), ("capacity_1", "r:")):
        a = arms[name]
        ax.axhline(a["mean"], color=style[0], ls=style[1:], label=f"{name}: {a['mean']:.3f} ± {a['std']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("table slots (rows over all hash heads of the Engram layer)")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"table size at a fixed backbone, {results['preset']}, {results['steps']} steps, "
                 f"{len(results['seeds'])} seeds, data {'/'.join(Path(results['data']).parts[-2:])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best", framealpha=0.8)
    fig.tight_layout()
    fig.savefig(path)


def summary(result: dict[str, Any]) -> list[str]:
    """Human lines of an ablations, boundary_reset or table_size result."""
    lines = []
    for arm, a in result["arms"].items():
        delta = f", {a['delta_vs_full']:+.4f} vs full" if "delta_vs_full" in a else ""
        reads = ", ".join(f"{r['reads_per_used_row']:,.1f}" for r in (a.get("row_reads") or {}).values())
        reads = f"; reads per used row {reads}" if reads else ""
        lines.append(f"{arm:16s} final val loss {a['mean']:.4f} ± {a['std']:.4f}{delta} "
                     f"(table rows {a['params']['table_rows']:,}, total {a['params']['total']:,}{reads})")
    return lines
