"""`engram eval`, `generate`, `offload`, `export-hf` and `info`: inference with what a run trained."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import (UserError, add_device_options, existing_dir, nonneg_float, nonneg_int, out_dir, positive_int,
                   probability)


def open_run(path: str, tables: str | None = None, cache_rows: int | None = None, device: str | None = None,
             overlays=(), force_overlays: bool = False):
    """`engram.runs.open_run` with skipped checkpoints reported on stderr and the bf16 warning;
    an overlay that does not fit is a one-line error."""
    from engram.memory.overlay import OverlayError
    from engram.runs import open_run as open_

    try:
        return open_(path, tables=tables, cache_rows=cache_rows, device=device or "auto",
                     warn=lambda m: print(m, file=sys.stderr), overlays=overlays or (), force_overlays=force_overlays)
    except OverlayError as e:
        raise UserError(str(e)) from None


def cmd_export_hf(args: argparse.Namespace) -> None:
    """Write a run's newest checkpoint as a transformers folder (EngramForCausalLM + tokenizer)."""
    from engram.hf.export import export_run

    ckpt = export_run(args.run, args.out, warn=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite)
    print(f"wrote {args.out} (from {ckpt}); load it with: transformers.AutoModelForCausalLM.from_pretrained("
          f"{str(args.out)!r}, trust_remote_code=True) (or import engram.hf first); evaluate it with: lm_eval "
          f"--model hf --model_args pretrained={args.out},trust_remote_code=True; serve it with: engram serve {args.out}")


def _convert(source: Path, args: argparse.Namespace, manifest: dict) -> dict:
    import torch

    from engram.memory import convert_checkpoint_tables
    from engram.memory.quantized import QuantizedTable

    if args.dtype in ("int8", "fp8"):
        return convert_checkpoint_tables(source, args.out, convert=QuantizedTable.from_checkpoint, kind=args.dtype,
                                         group=None if args.group == "row" else 32, manifest=manifest)
    if args.group != "row":
        raise UserError("--group applies to --dtype int8 or fp8 only")
    return convert_checkpoint_tables(source, args.out, dtype=torch.bfloat16 if args.dtype == "bf16" else None,
                                     manifest=manifest)


def cmd_offload(args: argparse.Namespace) -> None:
    """Write a run's (or model folder's) Engram tables as memory-mapped files for serving from disk."""
    from engram.runs import check_output, is_hf_folder, is_run, newest_checkpoint, offload_manifest

    path = Path(args.path)
    check_output(args.out, sources=[path], what="offload folder", overwrite=args.overwrite,
                 own=lambda p: any(p.glob("layer*.json")))
    source = newest_checkpoint(path, warn=lambda m: print(m, file=sys.stderr)) if is_run(path) else path
    sharded = (source / "dcp" / ".metadata").is_file()
    manifest = offload_manifest(source, args.dtype)
    if sharded or is_hf_folder(source):  # a distributed checkpoint or a transformers folder: consolidate first
        import shutil
        import tempfile

        from engram.model.io import load_model, save_model

        kind = "a distributed checkpoint" if sharded else "a transformers folder"
        print(f"{source} is {kind}: consolidating it in memory first", file=sys.stderr)
        tmp = Path(tempfile.mkdtemp(dir=Path(args.out).parent if Path(args.out).parent.is_dir() else None))
        try:
            save_model(load_model(source), tmp / "model")
            stems = _convert(tmp / "model", args, manifest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        stems = _convert(source, args, manifest)
    if not stems:
        raise UserError(f"{source} has no Engram tables")
    for layer, stem in stems.items():
        size = Path(str(stem) + ".bin").stat().st_size
        print(f"layer {layer}: {stem}.bin ({size / 2**20:,.2f} MiB, {args.dtype})")
    print(f"serve with: engram eval {args.path} --tables {args.out} --cache-rows N")


def cmd_eval(args: argparse.Namespace) -> None:
    """Validation loss and bits per byte of a run's newest checkpoint."""
    import resource

    from engram.device import warn_if_slow
    from engram.eval import evaluate
    from engram.runs import run_data

    model, run, ckpt = open_run(args.run, args.tables, args.cache_rows, args.device, args.overlay, args.force_overlay)
    warn_if_slow(model.embed.weight.device, args.dtype or "fp32")
    seq_len = args.seq_len or run["train"].get("seq_len") or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} is longer than the model's max_seq_len {model.config.max_seq_len}; "
                        f"use {model.config.max_seq_len} or less")
    data = run_data(run, args.data)
    if data.tokenizer.get_vocab_size() != model.config.vocab_size:
        raise UserError(f"{data.root} has a tokenizer of {data.tokenizer.get_vocab_size():,} ids, the model reads "
                        f"{model.config.vocab_size:,}; evaluate on a dataset built with the run's tokenizer "
                        "(engram data build --tokenizer RUN_DATA/tokenizer.json)")
    result = evaluate(model, data, seq_len, args.windows, dtype=args.dtype or "fp32")
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
    from engram.device import warn_if_slow
    from engram.runs import run_data
    from engram.train.loop import sample_text

    model, run, _ = open_run(args.run, args.tables, args.cache_rows, args.device, args.overlay, args.force_overlay)
    warn_if_slow(model.embed.weight.device, args.dtype or "fp32")
    tok = run_data(run).tokenizer
    print(sample_text(model, tok, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, dtype=args.dtype or "fp32",
                      draft=args.draft))


def cmd_info(args: argparse.Namespace) -> None:
    """Parameter table, hash layout and tokenizer of a run (or a model folder)."""
    from engram.model.accounting import format_counts, param_counts
    from engram.model.io import load_model
    from engram.runs import is_hf_folder, is_run

    path = Path(args.path)
    if is_run(path) or is_hf_folder(path):
        model, run, ckpt = open_run(args.path, device="cpu")
        print(f"run {path}: checkpoint {ckpt.name}, data {run['data_dir']}")
    else:
        model = load_model(path)
    print(format_counts(param_counts(model)))
    c = model.config
    print(f"\nbackbone: {c.n_layers} blocks x width {c.hidden_size}, {c.n_heads} heads ({c.kv_heads} kv), "
          f"M={c.n_streams} streams, " + (f"MoE {c.moe.n_routed_experts} experts top-{c.moe.top_k}"
                                          if c.moe else "dense MLP"))
    if model.layout is not None:
        lay = model.layout
        print(f"hash layout: Engram layers {list(lay.layer_ids)} (0-based), N={lay.max_ngram_size}, "
              f"{lay.n_head_per_ngram} heads/order, compressed vocab {lay.compressed_vocab_size:,}, seed {lay.seed}")
        for layer in lay.layer_ids:
            print(f"  layer {layer}: table sizes {list(lay.primes[layer])}")
    print(f"tokenizer: {c.vocab_size:,} ids" + (f" -> {c.engram.compressed_vocab_size:,} compressed"
                                              if c.engram else ""))


def _add_serving_options(parser) -> None:
    """Where the model runs and where its tables are served from (eval and generate)."""
    parser.add_argument("--tables", type=existing_dir, help="serve the Engram tables from this folder (engram offload)")
    parser.add_argument("--cache-rows", type=positive_int, help="hot rows kept in memory in front of --tables")
    parser.add_argument("--overlay", type=existing_dir, nargs="+", action="extend", metavar="DIR",
                        help="memory overlays (engram memory forget|write --overlay) applied over the tables, in "
                        "this order (a later one wins on a row both change)")
    parser.add_argument("--force-overlay", action="store_true",
                        help="apply overlays whose base rows or parent differ from the ones they were made on")
    add_device_options(parser)


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    ev.add_argument("run", type=existing_dir, help="run folder")
    ev.add_argument("--data", type=existing_dir, help="another dataset folder to evaluate on")
    ev.add_argument("--seq-len", type=positive_int)
    ev.add_argument("--windows", type=positive_int, default=256, help="validation windows to average (default 256)")
    _add_serving_options(ev)
    ev.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    gen.add_argument("run", type=existing_dir, help="run folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=positive_int, default=60)
    gen.add_argument("--temperature", type=nonneg_float, default=0.8, help="0 is greedy (default 0.8)")
    gen.add_argument("--top-k", type=positive_int, default=50)
    gen.add_argument("--top-p", type=probability)
    gen.add_argument("--seed", type=nonneg_int, default=0)
    gen.add_argument("--draft", choices=["prompt_lookup"], help="speculative decoding with drafts looked up in the "
                     "context (greedy: needs --temperature 0; the output is plain greedy's)")
    _add_serving_options(gen)
    gen.set_defaults(func=cmd_generate)

    off = sub.add_parser("offload", help=cmd_offload.__doc__, description=cmd_offload.__doc__)
    off.add_argument("path", type=existing_dir, help="run folder (its newest checkpoint) or model folder")
    off.add_argument("--out", required=True, type=out_dir, help="folder for the table files (layerN.json + layerN.bin)")
    off.add_argument("--overwrite", action="store_true", help="replace an earlier offload folder at --out")
    off.add_argument("--dtype", choices=["fp32", "bf16", "int8", "fp8"], default="fp32",
                     help="how rows are stored: as trained (fp32), bf16, or quantized with absmax scales: int8 or "
                     "fp8 (e4m3)")
    off.add_argument("--group", choices=["row", "32"], default="row",
                     help="int8/fp8: one scale per row (default) or per 32 values")
    off.set_defaults(func=cmd_offload)

    ex = sub.add_parser("export-hf", help=cmd_export_hf.__doc__, description=cmd_export_hf.__doc__)
    ex.add_argument("run", type=existing_dir, help="run folder (its newest good checkpoint)")
    ex.add_argument("--out", required=True, type=out_dir, help="the transformers folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export-hf folder at --out")
    ex.set_defaults(func=cmd_export_hf)

    info = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    info.add_argument("path", type=existing_dir, help="run folder or model folder")
    info.set_defaults(func=cmd_info)
