"""The training loop: deterministic on CPU for a seed, resumable to the same weights.

Every source of change is a function of (seed, step) or saved in the checkpoint: batches are
drawn from (seed, step), the model/optimizers/RNG are checkpointed, MoE balancing counts are
reset every step, and the learning rate is a pure function of the step. So a run killed at
any moment and resumed ends with the same weights and metrics as an uninterrupted one.

Where and how it computes (device, bf16 autocast, bf16 tables, activation checkpointing,
torch.compile) is set up by `engine`; one optimizer step is `train_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .. import presets
from ..config import ModelConfig
from ..durable import atomic_write_text
from ..hashing.compression import CompressedTokenizer
from ..model.generate import generate
from ..model.transformer import EngramLM
from ..precision import upcast
from . import engine
from .checkpoint import (latest_good_checkpoint, load_checkpoint, restore_optimizers, save_checkpoint,
                         verify_checkpoint)
from .dataset import PreparedData
from .metrics import MetricsLogger, plot_losses
from .optim import build_optimizers, clip_grad_norm
from .tokenizer import special_ids

PAPER_SIZED = ("moe_27b", "engram_27b")
# Settings a resumed run may change: none of them changes the numbers of the steps taken.
RESUME_MAY_CHANGE = ("max_steps", "max_bad_steps", "activation_checkpointing", "fsdp")


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm; the run stopped."""


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
        engine.check_device_spec(self.device)
        engine.check_dtype(self.dtype)
        engine.check_dtype(self.table_dtype, "table_dtype")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def preset_config(preset: str, *, vocab_size: int = 8192, compressed_vocab_size: int | None = None,
                  pad_id: int = 0, sparse_grad: bool | None = None, **overrides) -> ModelConfig:
    """A preset sized to a vocabulary (and its compression, when Engram hashes compressed ids)."""
    if preset not in presets.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(presets.PRESETS)}")
    config = dataclasses.replace(presets.PRESETS[preset](**overrides), vocab_size=vocab_size)
    if config.engram is not None:
        changes = dict(compressed_vocab_size=compressed_vocab_size or vocab_size, pad_id=pad_id)
        if sparse_grad is not None:
            changes["sparse_grad"] = sparse_grad
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, **changes))
    return config


def dataset_sizes(data: PreparedData, compression: CompressedTokenizer) -> dict[str, int]:
    """vocab_size, compressed_vocab_size and pad_id of a dataset's tokenizer, for `preset_config`."""
    pad = special_ids(data.tokenizer)["pad"] or 0
    return dict(vocab_size=data.tokenizer.get_vocab_size(), compressed_vocab_size=len(compression),
                pad_id=int(compression.lookup_table[pad]))


def model_config_for(cfg: TrainConfig, data: PreparedData, compression: CompressedTokenizer,
                     **overrides) -> ModelConfig:
    """The preset sized to the dataset's tokenizer and compressed vocabulary; sparse table
    gradients exactly when the table optimizer takes them."""
    return preset_config(cfg.preset, **dataset_sizes(data, compression), sparse_grad=cfg.table_optimizer != "adam",
                         **overrides)


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


@torch.no_grad()
def evaluate(model: EngramLM, data: PreparedData, seq_len: int, max_windows: int, *,
             dtype: str = "fp32", parallel=None) -> dict[str, float]:
    """Mean validation cross-entropy over consecutive windows, and bits per byte.

    With `parallel` the windows are dealt out to the ranks and the sums added up; every rank
    runs the same number of forwards (a sharded table's lookup is a collective), the last ones
    repeating a window that is not counted where the windows do not divide evenly."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    windows = [(w, True) for w in data.val.windows(seq_len, max_windows=max_windows)]
    if parallel is not None:
        W, rank = parallel.world_size, parallel.rank
        windows = windows[rank::W] + [(windows[0][0], False)] * (math.ceil(len(windows) / W) - len(windows[rank::W]))
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for window, counts in windows:
        window = window.to(device)
        with engine.autocast(device, dtype):
            logits = model(window[:, :-1]).logits
        if counts:  # a repeat that only keeps this rank in step with the others adds nothing
            total += F.cross_entropy(upcast(logits.flatten(0, 1)), window[:, 1:].flatten(), reduction="sum")
            n += window[:, 1:].numel()
    sums = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)])
    if parallel is not None:
        torch.distributed.all_reduce(sums, group=parallel.group)
    model.train(was_training)
    total, n = sums.tolist()
    loss = total / n
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token("val"), "val_tokens": int(n)}


def _set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over every target of the batch
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient norm: nothing was updated
    balance: dict[str, float]  # MoE load statistics (empty without MoE or when skipped)


def train_step(model: EngramLM, optimizers: list[torch.optim.Optimizer], ids_BT1: torch.Tensor, *,
               grad_accum: int = 1, grad_clip: float = 1.0, dtype: str = "fp32",
               logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
               recomputes: bool = False, parallel=None) -> StepResult:
    """One optimizer step on windows `ids_BT1` [B, T + 1] (inputs [:, :-1], targets [:, 1:]).

    The batch is split into `grad_accum` micro-batches, each forward and backward on its own.
    The loss is the mean over all B*T targets whatever the split: each micro-batch's summed
    cross-entropy is divided by B*T, so the accumulated gradient is the big batch's (up to the
    order of float additions). The MoE load counts add up over the micro-batches and the router
    biases move once, after the optimizer step. A non-finite loss or gradient norm skips the
    step: gradients and load counts are dropped and no weight changes. `logits_fn` is the
    (possibly compiled) forward; `recomputes`: the model is activation-checkpointed.

    `parallel` (`engram.distributed.Parallel`): this rank's share of the global batch; the loss
    and gradient norm are the global ones and the MoE loads are summed over ranks, so every
    rank takes the step one process would take on the whole batch (and all skip together).
    """
    device = ids_BT1.device
    if logits_fn is None:
        logits_fn = parallel.logits if parallel is not None else (lambda ids: model(ids).logits)
    B, T = ids_BT1.shape[0], ids_BT1.shape[1] - 1
    loss_sum = 0  # a tensor after the first micro-batch, in the loss's own precision
    micro = ids_BT1.split(B // grad_accum)
    for i, micro_bT1 in enumerate(micro):
        with contextlib.ExitStack() as sync:
            if parallel is not None:
                sync.enter_context(parallel.micro_batch(last=i == len(micro) - 1))
            with engine.autocast(device, dtype):
                logits_bTV = logits_fn(micro_bT1[:, :-1])
            ce = F.cross_entropy(upcast(logits_bTV.flatten(0, 1)), micro_bT1[:, 1:].flatten(),
                                 reduction="sum") / (B * T)
            with engine.restore_buffers(model, enabled=recomputes):
                ce.backward()
        loss_sum += ce.detach()
    if parallel is None:
        loss = loss_sum.item()
        grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], grad_clip)
    else:
        loss = parallel.mean(loss_sum)
        grad_norm = parallel.clip_grad_norm(grad_clip)
    skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
    if not skipped:
        for opt in optimizers:
            opt.step()
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    if skipped:
        for moe in model.moe_layers():
            moe.expert_load.zero_()
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=True, balance={})
    if parallel is not None:
        parallel.sum_moe_loads()
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=False, balance=model.update_router_biases())


def _config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: saved -> now' for every field that differs (nested configs key by key)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_same_run(out: Path, run: dict, cfg: TrainConfig, config: ModelConfig, data: PreparedData) -> None:
    """A resumed run must keep its settings, model and dataset: anything else would silently
    train a different model from the checkpoint's weights."""
    if "parent" in run:
        raise ValueError(f"{out} is an edited copy of {run['parent']['run']} (engram memory forget/write): it has "
                         "no optimizer state to resume from; train the parent run, or start a new run")
    saved = {**TrainConfig().to_dict(), **run["train"]}  # fields added since the run started: defaults
    now = cfg.to_dict()
    diff = _config_diff({k: v for k, v in saved.items() if k not in RESUME_MAY_CHANGE},
                        {k: v for k, v in now.items() if k not in RESUME_MAY_CHANGE})
    if diff:
        may = ", ".join("--" + k.replace("_", "-") for k in RESUME_MAY_CHANGE)
        raise ValueError(f"{out} was trained with other settings ({'; '.join(diff)}); resume with the same ones "
                         f"(only {may} may change)")
    diff = _config_diff(ModelConfig.from_dict(run["model"]).to_dict(), config.to_dict())
    if diff:
        raise ValueError(f"{out} was trained with another model config ({'; '.join(diff[:5])}); resume with the "
                         "same --preset or --config")
    if "data" in run and run["data"] != data.fingerprint():
        raise ValueError(f"{out} was trained on another dataset ({run['data_dir']}; {data.root} has another "
                         f"tokenizer or other token files); resume with --data {run['data_dir']}")


def _all_finite(model: torch.nn.Module, parallel=None) -> bool:
    """Every weight finite (on every rank: FSDP shards and table slices are checked where they
    live, and the ranks agree on the answer)."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
             for p in model.parameters() if p.is_floating_point())
    if parallel is None:
        return ok
    flag = torch.tensor([float(ok)], device=next(model.parameters()).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=parallel.group)
    return bool(flag.item())


def _silent(*args, **kwargs) -> None:
    """The `log` of ranks other than 0."""


def _log_metrics(metrics: MetricsLogger | None, record: dict) -> None:
    if metrics is not None:
        metrics.log(record)


def train(out_dir: str | os.PathLike, cfg: TrainConfig, *, data_dir: str | os.PathLike, resume: bool = False,
          model_overrides: dict | None = None, model_config: ModelConfig | None = None, log=print,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in `out_dir` on a prepared dataset. Returns a summary.

    The model is `cfg.preset` sized to the dataset (with `model_overrides`), or `model_config`
    as given (its vocabulary must match the dataset's tokenizer). Raises `TrainingDiverged`
    after `cfg.max_bad_steps` non-finite steps in a row (the newest checkpoint stays good)."""
    from .. import distributed as dist_

    W, rank = dist_.runtime.world_size(), dist_.runtime.rank()
    main = rank == 0  # the one rank that prints and writes files (all ranks write checkpoints)
    if not main:
        log = _silent
    out = Path(out_dir)
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
    device = dist_.runtime.rank_device(cfg.device) if W > 1 else engine.resolve_device(cfg.device)
    warning = engine.fit_warning(config, device, cfg.table_dtype)
    if warning:
        log(warning)
    ckpt = latest_good_checkpoint(out, warn=log) if resume else None
    if resume and ckpt is None:
        log(f"no usable checkpoint in {out}; starting from step 0")
    sharded_ckpt = ckpt is not None and dist_.checkpoint.is_distributed_checkpoint(ckpt)
    if ckpt is not None:
        check_same_run(out, json.loads((out / "run.json").read_text()), cfg, config, data)
        if sharded_ckpt:  # the weights come with the optimizer state, after the model is set up
            verify_checkpoint(ckpt)
            trainer = json.loads((ckpt / "trainer.json").read_text())
            model = EngramLM(config, compression=None if hashes_raw_ids(config) else compression)
        elif W > 1:
            raise ValueError(f"{ckpt} is a single-process checkpoint; resuming it on {W} ranks is not supported: "
                             "resume it in one process (without torchrun), or start the distributed run afresh")
        else:
            model, trainer = load_checkpoint(ckpt, device=str(device))
        start, skipped_total = trainer["step"], trainer.get("skipped_steps", 0)
        log(f"resuming from {ckpt.name} (step {start}, written by {trainer.get('world_size', 1)} rank(s))")
    else:
        torch.manual_seed(cfg.seed)
        model = EngramLM(config, compression=None if hashes_raw_ids(config) else compression)
        start, skipped_total = 0, 0
        if main:
            atomic_write_text(out / "run.json", json.dumps(
                {"train": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()), "data": data.fingerprint(),
                 "model": model.config.to_dict()}, indent=1))
    model.to(device)
    # the data loader's boundary check, once (the token files hold the tokenizer's ids; the
    # forward itself checks nothing, to stay free of host syncs)
    model.check_inputs(data.train.batch(start, cfg.batch_size, cfg.seq_len, cfg.seed)[:, :-1].to(device))
    engine.cast_tables(model, cfg.table_dtype)
    if cfg.activation_checkpointing:
        engine.checkpoint_blocks(model)
    parallel = dist_.parallelize(model, fsdp=cfg.fsdp) if W > 1 else None
    logits_fn = None
    if cfg.compile:
        logits_fn = engine.compile_logits(model if parallel is None else parallel.forward_module)
    optimizers = build_optimizers(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  table_lr_multiplier=cfg.table_lr_multiplier, table_optimizer=cfg.table_optimizer)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    if sharded_ckpt:
        dist_.checkpoint.load_training_state(ckpt, model, optimizers)
    elif ckpt is not None:
        restore_optimizers(ckpt, optimizers)
    metrics = MetricsLogger(out, resume_step=start if ckpt is not None else None) if main else None
    model.train()

    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    say = bar.write if bar is not None else log
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bad_streak = 0
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            lr = _set_lr(optimizers, lr_factor(step, cfg))
            ids = data.train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)  # the global batch: a rank's share
            share = cfg.batch_size // W
            ids = ids[rank * share:(rank + 1) * share].to(device, non_blocking=True)
            result = train_step(model, optimizers, ids, grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip,
                                dtype=cfg.dtype, logits_fn=logits_fn, recomputes=cfg.activation_checkpointing,
                                parallel=parallel)
            done = step + 1
            skipped_total += result.skipped
            bad_streak = bad_streak + 1 if result.skipped else 0
            _log_metrics(metrics, {"kind": "train", "step": done, "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                         "skipped": result.skipped, "skipped_steps": skipped_total, **result.balance,
                         "tokens_per_s": tokens_per_step / (time.perf_counter() - t0)})
            if result.skipped:
                say(f"step {done}: loss {result.loss}, gradient norm {result.grad_norm}: skipped "
                    f"({bad_streak} in a row, the run stops at {cfg.max_bad_steps})")
            if bad_streak >= cfg.max_bad_steps:
                newest = latest_good_checkpoint(out, warn=log)
                raise TrainingDiverged(
                    f"stopped at step {done}: {bad_streak} steps in a row had a non-finite loss or gradient norm; "
                    f"the newest good checkpoint is {newest or 'none (no checkpoint was written yet)'}; "
                    "resume from it with a lower --lr (or fix the data), or allow more with --max-bad-steps")
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                last_eval = evaluate(model, data, cfg.seq_len, cfg.eval_windows, dtype=cfg.dtype, parallel=parallel)
                _log_metrics(metrics, {"kind": "eval", "step": done, **last_eval})
                say(f"step {done}: val loss {last_eval['val_loss']:.4f}, {last_eval['val_bpb']:.3f} bits/byte")
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                if bad_streak:  # the last step was skipped: the newest checkpoint stays the last good state
                    say(f"step {done}: no checkpoint (the step was skipped)")
                elif not _all_finite(model, parallel):
                    raise TrainingDiverged(f"stopped at step {done}: the weights hold NaN or infinity although every "
                                           "step's loss and gradient norm were finite; the newest checkpoint "
                                           "stays the last good one; resume from it with a lower --lr")
                elif parallel is not None:
                    dist_.checkpoint.save_distributed_checkpoint(
                        out, done, model, optimizers, {"seed": cfg.seed, "skipped_steps": skipped_total},
                        keep_last=cfg.keep_last)
                else:
                    save_checkpoint(out, done, model, optimizers, {"seed": cfg.seed, "skipped_steps": skipped_total},
                                    keep_last=cfg.keep_last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}")
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    sample = None
    if cfg.sample_prompt:  # on every rank: decoding looks rows up in the sharded tables too
        sample = sample_text(model, data.tokenizer, cfg.sample_prompt, seed=cfg.seed, dtype=cfg.dtype)
    if not main:
        return {"steps": cfg.max_steps, "run_dir": str(out), "rank": rank}
    records = metrics.read()
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
    with engine.autocast(model.embed.weight.device, dtype):
        new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=eos, seed=seed, draft=draft)[0]
    if eos is not None and new and new[-1] == eos:
        new = new[:-1]
    return prompt + tokenizer.decode(new)
