"""`engram train`: a language model trained on a prepared dataset, deterministic for a seed
and resumable to the same weights.

Every source of change is a function of (seed, step) or saved in the checkpoint: batches are
drawn from (seed, step), the model/optimizers/RNG are checkpointed, MoE balancing counts are
reset every step, and the learning rate is a pure function of the step. So a run killed at
any moment and resumed ends with the same weights and metrics as an uninterrupted one.

This file sets a run up (`TrainConfig`, the model for the dataset, resume); the loop itself is
`trainer.Trainer`, where and how it computes (bf16 tables, activation checkpointing,
torch.compile) is `engine`, and the run folder is `engram.runs`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import device as device_
from .. import distributed as dist_
from .. import presets
from ..config import ModelConfig, check_field_types
from ..data.dataset import PreparedData
from ..data.tokenizer import special_ids
from ..durable import atomic_write_text
from ..eval import evaluate
from ..hashing.compression import CompressedTokenizer
from ..model.generate import generate
from ..model.transformer import EngramLM
from ..runs import Checkpoints, check_output, check_same_run, load_checkpoint, write_run
from . import engine
from .metrics import MetricsLogger, plot_losses
from .optim import build_optimizers
from .trainer import Trainer, TrainingDiverged, cosine_schedule

__all__ = ["TrainConfig", "TrainingDiverged", "train", "preset_config", "model_config_for", "sample_text"]

PAPER_SIZED = ("moe_27b", "engram_27b")
# Settings a resumed run may change: none of them changes the numbers of the steps taken.
RESUME_MAY_CHANGE = ("max_steps", "max_bad_steps", "activation_checkpointing", "fsdp")
# Model fields a resumed run may differ in: how the tables started (the weights come from the
# checkpoint), so a run begun before zero-initialized tables became the default resumes as is.
RESUME_MODEL_MAY_CHANGE = ("engram.table_init_std",)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str = "tiny"  # ignored when train() is given a model_config
    seed: int = 0
    batch_size: int = 16  # sequences per optimizer step, split into grad_accum micro-batches
    seq_len: int = 128
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    table_optimizer: str = "adam"  # "adam" (dense, the paper's), "sparse_adam", "row_adam"
    table_lr_multiplier: float = 5.0  # paper: the tables learn 5x faster
    eval_every: int = 100
    eval_windows: int = 64
    checkpoint_every: int = 100
    keep_last: int = 3
    sample_prompt: str = "The history of"
    grad_accum: int = 1  # micro-batches per step: the same update as one batch, in 1/grad_accum the memory
    device: str = "auto"  # auto (a GPU if there is one), cpu, cuda, cuda:N
    dtype: str = "fp32"  # compute: "bf16" = autocast; weights, gradients, optimizer state stay float32
    table_dtype: str = "fp32"  # how the Engram tables are stored ("bf16": half the memory)
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile the training forward and backward
    max_bad_steps: int = 5  # stop after this many steps in a row with a non-finite loss or gradient
    fsdp: bool = False  # under torchrun: shard the backbone with FSDP2 (default DDP); tables are always sharded

    def __post_init__(self) -> None:
        if self.preset not in presets.PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {list(presets.PRESETS)}, "
                             "or give a model config (engram train --config model.json)")
        for name in ("batch_size", "seq_len", "max_steps", "eval_every", "eval_windows", "checkpoint_every",
                     "keep_last", "grad_accum", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                             f"{self.min_lr_ratio}, {self.warmup_steps}")
        if self.table_optimizer not in ("adam", "sparse_adam", "row_adam"):
            raise ValueError(f"table_optimizer must be adam, sparse_adam or row_adam, got {self.table_optimizer!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum}): "
                             "each step's batch is split into grad_accum equal micro-batches")
        device_.check_device_spec(self.device)
        device_.check_dtype(self.dtype)
        device_.check_dtype(self.table_dtype, "table_dtype")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "the training config") -> "TrainConfig":
        """Fields checked one by one, types included; an error names the field and `where`."""
        check_field_types(cls, data, where)
        try:
            return cls(**data)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 to min_lr_ratio at max_steps."""
    return cosine_schedule(step, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, min_lr_ratio=cfg.min_lr_ratio)


def preset_config(preset: str, *, vocab_size: int = 8192, compressed_vocab_size: int | None = None,
                  pad_id: int = 0, **overrides) -> ModelConfig:
    """A preset sized to a vocabulary (and its compression, when Engram hashes compressed ids)."""
    if preset not in presets.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets.PRESETS)}")
    config = dataclasses.replace(presets.PRESETS[preset](**overrides), vocab_size=vocab_size)
    if config.engram is not None:
        changes = dict(compressed_vocab_size=compressed_vocab_size or vocab_size, pad_id=pad_id)
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, **changes))
    return config


def dataset_sizes(data: PreparedData, compression: CompressedTokenizer) -> dict[str, int]:
    """vocab_size, compressed_vocab_size and pad_id of a dataset's tokenizer, for `preset_config`."""
    pad = special_ids(data.tokenizer)["pad"] or 0
    return dict(vocab_size=data.tokenizer.get_vocab_size(), compressed_vocab_size=len(compression),
                pad_id=int(compression.lookup_table[pad]))


def model_config_for(cfg: TrainConfig, data: PreparedData, compression: CompressedTokenizer,
                     **overrides) -> ModelConfig:
    """The preset sized to the dataset's tokenizer and compressed vocabulary."""
    return preset_config(cfg.preset, **dataset_sizes(data, compression), **overrides)


def hashes_raw_ids(config: ModelConfig) -> bool:
    """An Engram config whose compressed vocabulary is the full vocabulary hashes raw ids (the
    "no tokenizer compression" ablation); otherwise ids go through the compression."""
    return config.engram is None or config.engram.compressed_vocab_size == config.vocab_size


def check_fits_data(config: ModelConfig, data: PreparedData, compression: CompressedTokenizer,
                    seq_len: int) -> None:
    """The model must read the dataset's ids, and windows of `seq_len` tokens."""
    vocab = data.tokenizer.get_vocab_size()
    if config.vocab_size != vocab:
        raise ValueError(f"the model config has vocab_size {config.vocab_size:,} but the dataset's tokenizer "
                         f"({data.root}) has {vocab:,} ids; set vocab_size to {vocab}, or write a config for this "
                         f"dataset with: engram config --preset NAME --data {data.root}")
    if not hashes_raw_ids(config) and config.engram.compressed_vocab_size != len(compression):
        raise ValueError(f"the model config has engram.compressed_vocab_size {config.engram.compressed_vocab_size:,}"
                         f", but the dataset's tokenizer compresses to {len(compression):,} ids (or {vocab:,} for raw "
                         f"ids); write a config for this dataset with: engram config --preset NAME --data {data.root}")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_seq_len {config.max_seq_len}; "
                         f"use --seq-len {config.max_seq_len} or less, or a model config with a larger max_seq_len")


@dataclass
class _Run:
    """What `train` sets up: the model on its device (parallelized on several ranks), its
    optimizers, the checkpoint it resumes from and the Trainer state to continue."""
    model: EngramLM
    optimizers: list
    parallel: Any
    start: int
    skipped_steps: int
    resumed: bool


def _start_or_resume(out: Path, cfg: TrainConfig, config: ModelConfig, data: PreparedData, data_dir,
                     compression: CompressedTokenizer, checkpoints: Checkpoints, resume: bool, device, log) -> _Run:
    """Build the model and optimizers, from the newest good checkpoint when resuming."""
    W = dist_.runtime.world_size()
    ckpt = checkpoints.latest_good(warn=log) if resume else None
    if resume and ckpt is None:
        log(f"no usable checkpoint in {out}; starting from step 0")
    fresh = lambda: EngramLM(config, compression=None if hashes_raw_ids(config) else compression)  # noqa: E731
    if ckpt is not None:
        check_same_run(out, settings_key="train", settings=cfg.to_dict(), defaults=TrainConfig().to_dict(),
                       may_change=RESUME_MAY_CHANGE, model=config.to_dict(), data=data.fingerprint(),
                       model_may_change=RESUME_MODEL_MAY_CHANGE)
        sharded = dist_.checkpoint.is_distributed_checkpoint(ckpt)
        if not sharded and W > 1:
            raise ValueError(f"{ckpt} is a single-process checkpoint; resuming it on {W} ranks is not supported: "
                             "resume it in one process (without torchrun), or start the distributed run afresh")
        model = fresh() if sharded else load_checkpoint(ckpt, device=str(device))[0]  # sharded: weights below
    else:
        torch.manual_seed(cfg.seed)
        model = fresh()
        if dist_.runtime.rank() == 0:
            write_run(out, {"train": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()),
                            "data": data.fingerprint(), "model": model.config.to_dict()})
    model.to(device)
    start = int(json.loads((ckpt / "trainer.json").read_text())["step"]) if ckpt is not None else 0
    # the data loader's boundary check, once (the token files hold the tokenizer's ids; the
    # forward itself checks nothing, to stay free of host syncs)
    model.check_inputs(data.train.batch(start, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1].to(device))
    engine.cast_tables(model, cfg.table_dtype)
    if cfg.activation_checkpointing:
        engine.checkpoint_blocks(model)
    parallel = dist_.parallelize(model, fsdp=cfg.fsdp) if W > 1 else None
    optimizers = build_optimizers(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  table_lr_multiplier=cfg.table_lr_multiplier, table_optimizer=cfg.table_optimizer)
    state = checkpoints.restore(ckpt, model, optimizers) if ckpt is not None else {}
    if ckpt is not None:
        log(f"resuming from {ckpt.name} (step {start}, written by {state.get('world_size', 1)} rank(s))")
    return _Run(model, optimizers, parallel, start, state.get("skipped_steps", 0), ckpt is not None)


def _device(cfg: TrainConfig, config: ModelConfig, log) -> torch.device:
    """This rank's device, with a warning when the model cannot fit or bf16 would crawl there."""
    W = dist_.runtime.world_size()
    device = dist_.runtime.rank_device(cfg.device) if W > 1 else device_.resolve_device(cfg.device)
    warning = engine.fit_warning(config, device, cfg.table_dtype)
    if warning:
        log(warning)
    device_.warn_if_slow(device, cfg.dtype)
    return device


def train(out_dir: str | os.PathLike, cfg: TrainConfig, *, data_dir: str | os.PathLike, resume: bool = False,
          model_overrides: dict | None = None, model_config: ModelConfig | None = None, log=print,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in `out_dir` on a prepared dataset. Returns a summary.

    The model is `cfg.preset` sized to the dataset (with `model_overrides`), or `model_config`
    as given (its vocabulary must match the dataset's tokenizer). Raises `TrainingDiverged`
    after `cfg.max_bad_steps` non-finite steps in a row (the newest checkpoint stays good)."""
    W, rank = dist_.runtime.world_size(), dist_.runtime.rank()
    main = rank == 0  # the one rank that prints and writes files (all ranks write checkpoints)
    log = log if main else (lambda *a, **k: None)
    out = Path(out_dir)
    inside = Path(data_dir).resolve().parent == out.resolve()  # the default: the corpus built in OUT/data
    check_output(out, sources=() if inside else [data_dir], what="run", resume=resume, may_hold=[Path(data_dir).name]
                 if inside else ())
    out.mkdir(parents=True, exist_ok=True)
    data = PreparedData.open(data_dir)
    compression = CompressedTokenizer.from_tokenizer(data.tokenizer)
    config = model_config or model_config_for(cfg, data, compression, **(model_overrides or {}))
    check_fits_data(config, data, compression, cfg.seq_len)
    if cfg.batch_size % W or (cfg.batch_size // W) % cfg.grad_accum:
        raise ValueError(f"batch_size {cfg.batch_size} must split into {W} ranks x grad_accum {cfg.grad_accum} "
                         f"equal micro-batches; use a --batch-size that is a multiple of {W * cfg.grad_accum}")
    dist_.runtime.check_same_on_all_ranks("run (settings, model config or dataset)",
                                          {"train": cfg.to_dict(), "model": config.to_dict(),
                                           "data": data.fingerprint()})
    device = _device(cfg, config, log)
    checkpoints = Checkpoints(out, keep_last=cfg.keep_last, sharded=dist_.checkpoint.DCP)
    run = _start_or_resume(out, cfg, config, data, data_dir, compression, checkpoints, resume, device, log)
    model, share = run.model, cfg.batch_size // W
    metrics = MetricsLogger(out, resume_step=run.start if run.resumed else None) if main else None
    trainer = Trainer(
        model=model, optimizers=run.optimizers, max_steps=cfg.max_steps, parallel=run.parallel,
        batches=lambda step: data.train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)[  # a rank's share
            rank * share:(rank + 1) * share].to(device, non_blocking=True),
        schedule=lambda step: lr_factor(step, cfg), grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
        dtype=cfg.dtype, recomputes=cfg.activation_checkpointing,
        logits_fn=engine.compile_logits(model if run.parallel is None else run.parallel.forward_module)
        if cfg.compile else None,
        evaluate=lambda: evaluate(model, data, cfg.seq_len, cfg.eval_windows, dtype=cfg.dtype, parallel=run.parallel),
        eval_every=cfg.eval_every, checkpoints=checkpoints, checkpoint_every=cfg.checkpoint_every,
        checkpoint_state={"seed": cfg.seed}, max_bad_steps=cfg.max_bad_steps, skipped_steps=run.skipped_steps,
        metrics=metrics,
        tokens_per_step=cfg.batch_size * cfg.seq_len, progress="train" if progress and main else None, log=log)
    trainer.fit(run.start)
    sample = None
    if cfg.sample_prompt:  # on every rank: decoding looks rows up in the sharded tables too
        sample = sample_text(model, data.tokenizer, cfg.sample_prompt, seed=cfg.seed, dtype=cfg.dtype)
    if not main:
        return {"steps": cfg.max_steps, "run_dir": str(out), "rank": rank}
    return _summarize(out, cfg, data_dir, metrics.read(), sample)


def _summarize(out: Path, cfg: TrainConfig, data_dir, records: list[dict], sample: str | None) -> dict[str, Any]:
    """summary.json and loss_curve.png of a finished run."""
    plot_losses(records, out / "loss_curve.png", title=f"{cfg.preset}, seed {cfg.seed}: {_source(data_dir)}")
    evals = [r for r in records if r.get("kind") == "eval"]
    train_records = [r for r in records if r.get("kind") == "train"]
    summary = {"steps": cfg.max_steps, "first_val_loss": evals[0]["val_loss"] if evals else None,
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "final_val_bpb": evals[-1]["val_bpb"] if evals else None,
               "skipped_steps": train_records[-1].get("skipped_steps", 0) if train_records else 0,
               "run_dir": str(out)}
    if sample is not None:
        summary["sample"] = sample
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary

def _source(data_dir) -> str:
    """The corpus name recorded in corpus.json (else the folder name), for plot titles."""
    try:
        return json.loads((Path(data_dir) / "corpus.json").read_text())["source"]
    except (OSError, KeyError, ValueError):
        return Path(data_dir).name


def sample_text(model: EngramLM, tokenizer, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.8,
                top_k: int | None = 50, top_p: float | None = None, seed: int = 0, dtype: str = "fp32",
                draft: str | None = None) -> str:
    """Decode a continuation of `prompt` (stops at the tokenizer's end-of-sequence token);
    `draft="prompt_lookup"`: greedy, speculatively (see `engram.model.speculative_generate`)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = special_ids(tokenizer)["eos"]
    with device_.autocast(model.embed.weight.device, dtype):
        new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=eos, seed=seed, draft=draft)[0]
    if eos is not None and new and new[-1] == eos:
        new = new[:-1]
    return prompt + tokenizer.decode(new)
