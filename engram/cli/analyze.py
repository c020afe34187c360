"""`engram analyze`: what the memory learned (gates, ablation, LogitLens, CKA, table statistics)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engram.runs import run_data

from .args import UserError, existing_dir, out_dir, positive_int
from .data import SAMPLE
from .inference import open_run


def _seq_len(run: dict) -> int:
    """The run's training window (an exported model folder may not say: then 128)."""
    return run.get("train", {}).get("seq_len") or 128


def _analysis_windows(run: dict, n: int, seq_len: int | None = None):
    """The first `n` validation windows of the run's dataset, [n, T] ids."""
    import torch

    data = run_data(run)
    windows = list(data.val.windows(seq_len or _seq_len(run), max_windows=n))
    return data, torch.cat([w[:, :-1] for w in windows])


def cmd_analyze(args: argparse.Namespace) -> None:
    """What the memory learned: gates, ablation, LogitLens, CKA, table statistics."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, run, ckpt = open_run(args.run, device="cpu")
    if args.what == "gates":
        from engram.analysis.gates import plot_gates

        paths = plot_gates(model, run_data(run).tokenizer, args.text, out)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    elif args.what == "ablation":
        from engram.analysis.ablation import ablation_eval

        data, _ = _analysis_windows(run, 1)
        report = ablation_eval(model, data, _seq_len(run), args.windows)
        for name, r in report.items():
            print(f"{name:10s} full {r['full']:.4f}  Engram zeroed {r['ablated']:.4f}  kept {r['kept_fraction']:.1%}")
        (out / "ablation.json").write_text(json.dumps(report, indent=1))
    elif args.what in ("logit-lens", "cka"):
        import torch

        from engram.analysis.cka import cka_matrix, plot_cka, soft_alignment_index
        from engram.analysis.logit_lens import logit_lens_kl, plot_logit_lens

        other = None
        if args.other:
            other, other_run, _ = open_run(args.other, device="cpu")
            if other_run.get("data_dir") != run.get("data_dir"):
                print("note: the two runs used different datasets; both are fed the first run's text")
        _, ids = _analysis_windows(run, args.windows)
        if args.what == "logit-lens":
            curves = {Path(args.run).name: logit_lens_kl(model, ids)}
            if other is not None:
                curves[Path(args.other).name] = logit_lens_kl(other, ids)
            plot_logit_lens(curves, out / "logit_lens.png")
            for label, kl in curves.items():
                print(f"{label}: KL per layer " + " ".join(f"{v:.3f}" for v in kl))
            print(f"plot: {out / 'logit_lens.png'}")
        else:
            if other is None:
                raise UserError("cka compares two runs: engram analyze cka RUN --other RUN2 --out DIR")
            with torch.no_grad():
                ha = model(ids, return_intermediates=True).intermediates["hidden_states"]
                hb = other(ids, return_intermediates=True).intermediates["hidden_states"]
            S = cka_matrix(ha, hb)
            plot_cka(S, out / "cka.png", labels=(Path(args.run).name, Path(args.other).name))
            index = soft_alignment_index(S, k=5)
            print("soft-alignment index (layer of the second run each layer of the first lands on): "
                  + " ".join(f"{v:.2f}" for v in index))
            print(f"plot: {out / 'cka.png'}")
    else:  # tables
        from engram.analysis.table_stats import plot_table_stats, summarize, table_statistics

        _, ids = _analysis_windows(run, args.windows)
        stats = table_statistics(model, ids.split(8))
        summary = summarize(stats)
        (out / "table_stats.json").write_text(json.dumps(summary, indent=1, default=float))
        print(json.dumps(summary, indent=1, default=float))
        print("\n".join(f"plot: {p}" for p in plot_table_stats(stats, out)))
    print(f"(checkpoint {ckpt.name})")


def add_commands(sub) -> None:
    an = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    an.add_argument("what", choices=["gates", "ablation", "logit-lens", "cka", "tables"])
    an.add_argument("run", type=existing_dir, help="run folder")
    an.add_argument("--other", type=existing_dir, help="a second run to compare with (logit-lens, cka)")
    an.add_argument("--text", default=SAMPLE, help="text for the gate heatmap")
    an.add_argument("--windows", type=positive_int, default=32, help="validation windows to analyze (default 32)")
    an.add_argument("--out", type=out_dir, default="analysis", help="folder for plots and JSON (default ./analysis)")
    an.set_defaults(func=cmd_analyze)
