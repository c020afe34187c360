"""The training loop: deterministic on CPU for a seed, resumable to the same weights.

Every source of change is a function of (seed, step) or saved in the checkpoint: batches are
drawn from (seed, step), the model/optimizers/RNG are checkpointed, MoE balancing counts are
reset every step, and the learning rate is a pure function of the step. So a run killed at
any moment and resumed ends with the same weights and metrics as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import presets
from ..config import ModelConfig
from ..hashing.compression import CompressedTokenizer
from ..model.generate import generate
from ..model.transformer import EngramLM
from .checkpoint import latest_good_checkpoint, load_checkpoint, restore_optimizers, save_checkpoint
from .dataset import PreparedData
from .metrics import MetricsLogger, plot_losses
from .optim import build_optimizers, clip_grad_norm
from .tokenizer import special_ids

TRAINABLE_PRESETS = ("tiny", "small")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    preset: str = "tiny"
    seed: int = 0
    batch_size: int = 16
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

    def __post_init__(self) -> None:
        if self.preset not in TRAINABLE_PRESETS:
            raise ValueError(f"unknown or untrainable preset {self.preset!r}; choose one of {list(TRAINABLE_PRESETS)} "
                             "(moe_27b/engram_27b are paper-sized, for accounting on the meta device)")
        for name in ("batch_size", "seq_len", "max_steps", "eval_every", "eval_windows", "checkpoint_every",
                     "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1 or self.warmup_steps < 0:
            raise ValueError(f"need lr > 0, 0 <= min_lr_ratio <= 1, warmup_steps >= 0; got {self.lr}, "
                             f"{self.min_lr_ratio}, {self.warmup_steps}")
        if self.table_optimizer not in ("adam", "sparse_adam", "row_adam"):
            raise ValueError(f"table_optimizer must be adam, sparse_adam or row_adam, got {self.table_optimizer!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay from 1 to min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def model_config_for(cfg: TrainConfig, data: PreparedData, compression: CompressedTokenizer,
                     **overrides) -> ModelConfig:
    """The preset sized to the dataset's tokenizer and compressed vocabulary."""
    pad = special_ids(data.tokenizer)["pad"] or 0
    sparse = cfg.table_optimizer != "adam"
    base = presets.PRESETS[cfg.preset](vocab_size=data.tokenizer.get_vocab_size(),
                                       compressed_vocab_size=len(compression),
                                       pad_id=int(compression.lookup_table[pad]), **overrides)
    if base.engram is not None and base.engram.sparse_grad != sparse:
        base = dataclasses.replace(base, engram=dataclasses.replace(base.engram, sparse_grad=sparse))
    return base


@torch.no_grad()
def evaluate(model: EngramLM, data: PreparedData, seq_len: int, max_windows: int) -> dict[str, float]:
    """Mean validation cross-entropy over consecutive windows, and bits per byte."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for window in data.val.windows(seq_len, max_windows=max_windows):
        logits = model(window[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="sum").item()
        n += window.shape[1] - 1
    model.train(was_training)
    loss = total / n
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token("val"), "val_tokens": n}


def _set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]


def train(out_dir: str | os.PathLike, cfg: TrainConfig, *, data_dir: str | os.PathLike, resume: bool = False,
          model_overrides: dict | None = None, model_config: ModelConfig | None = None, log=print,
          progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a run in `out_dir` on a prepared dataset. Returns a summary.

    The model is `cfg.preset` sized to the dataset (with `model_overrides`), or `model_config`
    as given (its vocabulary must match the dataset's tokenizer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = PreparedData.open(data_dir)
    compression = CompressedTokenizer.from_tokenizer(data.tokenizer)
    ckpt = latest_good_checkpoint(out, warn=log) if resume else None
    if resume and ckpt is None:
        log(f"no usable checkpoint in {out}; starting from step 0")
    if ckpt is not None:
        run = json.loads((out / "run.json").read_text())
        saved = TrainConfig(**run["train"])
        if dataclasses.replace(saved, max_steps=cfg.max_steps) != cfg:
            raise ValueError(f"{out} was trained with other settings ({saved}); resume with the same ones "
                             "(only --max-steps may change)")
        model, trainer = load_checkpoint(ckpt)
        start = trainer["step"]
        log(f"resuming from {ckpt.name} (step {start})")
    else:
        torch.manual_seed(cfg.seed)
        config = model_config or model_config_for(cfg, data, compression, **(model_overrides or {}))
        # An Engram config whose compressed vocabulary is the full vocabulary hashes raw ids
        # (the "no tokenizer compression" ablation); otherwise ids go through the compression.
        raw_ids = config.engram is None or config.engram.compressed_vocab_size == config.vocab_size
        model = EngramLM(config, compression=None if raw_ids else compression)
        start = 0
        (out / "run.json").write_text(json.dumps(
            {"train": cfg.to_dict(), "data_dir": str(Path(data_dir).resolve()), "model": model.config.to_dict()},
            indent=1))
    optimizers = build_optimizers(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  table_lr_multiplier=cfg.table_lr_multiplier, table_optimizer=cfg.table_optimizer)
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
    if ckpt is not None:
        restore_optimizers(ckpt, optimizers)
    metrics = MetricsLogger(out, resume_step=start if ckpt is not None else None)
    model.train()

    def checkpoint(step: int) -> None:
        save_checkpoint(out, step, model, optimizers, {"seed": cfg.seed}, keep_last=cfg.keep_last)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last_eval: dict[str, float] = {}
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        lr = _set_lr(optimizers, lr_factor(step, cfg))
        ids = data.train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
        logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        balance = model.update_router_biases()
        done = step + 1
        seconds = time.perf_counter() - t0
        metrics.log({"kind": "train", "step": done, "loss": loss.item(), "lr": lr, "grad_norm": grad_norm,
                     **balance, "tokens_per_s": tokens_per_step / seconds})
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            last_eval = evaluate(model, data, cfg.seq_len, cfg.eval_windows)
            metrics.log({"kind": "eval", "step": done, **last_eval})
            message = f"step {done}: val loss {last_eval['val_loss']:.4f}, {last_eval['val_bpb']:.3f} bits/byte"
            (bar.write if bar is not None else log)(message)
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            checkpoint(done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    if bar is not None:
        bar.close()
    metrics.close()
    records = metrics.read()
    plot_losses(records, out / "loss_curve.png", title=f"{cfg.preset}, seed {cfg.seed}: {_source(data_dir)}")
    evals = [r for r in records if r.get("kind") == "eval"]
    summary = {"steps": cfg.max_steps, "first_val_loss": evals[0]["val_loss"] if evals else None,
               "final_val_loss": evals[-1]["val_loss"] if evals else None,
               "final_val_bpb": evals[-1]["val_bpb"] if evals else None, "run_dir": str(out)}
    if cfg.sample_prompt:
        summary["sample"] = sample_text(model, data.tokenizer, cfg.sample_prompt, seed=cfg.seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _source(data_dir) -> str:
    """The corpus name recorded in corpus.json (else the folder name), for plot titles."""
    try:
        return json.loads((Path(data_dir) / "corpus.json").read_text())["source"]
    except (OSError, KeyError, ValueError):
        return Path(data_dir).name


def sample_text(model: EngramLM, tokenizer, prompt: str, *, max_new_tokens: int = 40, temperature: float = 0.8,
                top_k: int | None = 50, top_p: float | None = None, seed: int = 0) -> str:
    """Decode a continuation of `prompt` (stops at the tokenizer's end-of-sequence token)."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    eos = special_ids(tokenizer)["eos"]
    new = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   eos_id=eos, seed=seed)[0]
    if eos is not None and new and new[-1] == eos:
        new = new[:-1]
    return prompt + tokenizer.decode(new)
