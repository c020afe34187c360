"""The one training loop: `engram train`, `engram retrofit` and `memory write` all run a `Trainer`.

A Trainer steps an optimizer on batches that are a pure function of the step, on a learning
rate that is a pure function of the step, evaluates and checkpoints on a fixed cadence, and
stops a run that keeps producing non-finite steps. What differs between its users is given to
it: the model's forward (`logits_fn`), the batches, the evaluation, and where checkpoints go.
So a run killed at any moment and resumed from its newest checkpoint ends with the same weights
and metrics as an uninterrupted one, whichever command started it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..device import autocast
from ..precision import upcast
from ..runs import Checkpoints, latest_good_checkpoint
from . import engine
from .metrics import MetricsLogger
from .optim import clip_grad_norm


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm; the run stopped."""


def cosine_schedule(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate factor: linear warmup, then cosine decay from 1 to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class StepResult:
    loss: float  # mean cross-entropy over every target of the batch
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient norm: nothing was updated
    balance: dict[str, float]  # MoE load statistics (empty without MoE or when skipped)


def train_step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
               batch: torch.Tensor | Sequence[torch.Tensor], *, grad_accum: int = 1, grad_clip: float = 1.0,
               dtype: str = "fp32", logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
               recomputes: bool = False, parallel=None, balance_moe: bool = True) -> StepResult:
    """One optimizer step on windows (inputs [:, :-1], targets [:, 1:]).

    `batch` is one [B, T + 1] tensor, split into `grad_accum` micro-batches, or a list of
    windows (of any lengths), each its own micro-batch. Each micro-batch runs its forward and
    backward on its own; the loss is the mean over all targets whatever the split (each
    micro-batch's summed cross-entropy is divided by the total target count), so the
    accumulated gradient is the big batch's up to the order of float additions. The MoE load
    counts add up over the micro-batches and the router biases move once, after the optimizer
    step (`balance_moe`). A non-finite loss or gradient norm skips the step: gradients and load
    counts are dropped and no weight changes. `logits_fn` is the (possibly compiled) forward;
    `recomputes`: the model is activation-checkpointed.

    `parallel` (`engram.distributed.Parallel`): this rank's share of the global batch; the loss
    and gradient norm are the global ones and the MoE loads are summed over ranks, so every
    rank takes the step one process would take on the whole batch (and all skip together).
    """
    if logits_fn is None:
        logits_fn = parallel.logits if parallel is not None else (lambda ids: model(ids).logits)
    micro = batch.split(batch.shape[0] // grad_accum) if isinstance(batch, torch.Tensor) else list(batch)
    targets = sum(m[:, 1:].numel() for m in micro)
    loss_sum = 0  # a tensor after the first micro-batch, in the loss's own precision
    for i, micro_bT1 in enumerate(micro):
        with contextlib.ExitStack() as sync:
            if parallel is not None:
                sync.enter_context(parallel.micro_batch(last=i == len(micro) - 1))
            with autocast(micro_bT1.device, dtype):
                logits_bTV = logits_fn(micro_bT1[:, :-1])
            ce = F.cross_entropy(upcast(logits_bTV.flatten(0, 1)), micro_bT1[:, 1:].flatten(),
                                 reduction="sum") / targets
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
    moe_layers = model.moe_layers() if balance_moe and hasattr(model, "moe_layers") else []
    if skipped:
        for moe in moe_layers:
            moe.expert_load.zero_()
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=True, balance={})
    if not moe_layers:
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=False, balance={})
    if parallel is not None:
        parallel.sum_moe_loads()
    return StepResult(loss=loss, grad_norm=grad_norm, skipped=False, balance=model.update_router_biases())


def all_finite(model: torch.nn.Module, parallel=None) -> bool:
    """Every trainable weight finite (on every rank: FSDP shards and table slices are checked
    where they live, and the ranks agree on the answer)."""
    ok = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
             for p in model.parameters() if p.is_floating_point() and p.requires_grad)
    if parallel is None:
        return ok
    flag = torch.tensor([float(ok)], device=next(model.parameters()).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=parallel.group)
    return bool(flag.item())


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> float:
    """Every group's learning rate to its `initial_lr` times `factor`; returns the first."""
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor
    return optimizers[0].param_groups[0]["lr"]


@dataclass
class Trainer:
    """Setup is the caller's (model, optimizers, batches); the Trainer steps, evaluates and
    checkpoints. `batches(step)` gives the step's windows on the model's device (a tensor or a
    list of windows, see `train_step`); `schedule(step)` the learning-rate factor;
    `evaluate()` a dict of held-out metrics (with `val_loss`), logged as an `eval` record."""

    model: torch.nn.Module
    optimizers: list[torch.optim.Optimizer]
    batches: Callable[[int], torch.Tensor | Sequence[torch.Tensor]]
    max_steps: int
    schedule: Callable[[int], float] = lambda step: 1.0
    grad_accum: int = 1
    grad_clip: float = 1.0
    dtype: str = "fp32"
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
    recomputes: bool = False
    parallel: Any = None
    balance_moe: bool = True
    train_mode: bool = True  # the model's mode while stepping (memory edits step in eval mode)
    evaluate: Callable[[], dict[str, float]] | None = None
    eval_every: int = 0  # 0: only at the end (when `evaluate` is given)
    checkpoints: Checkpoints | None = None
    checkpoint_every: int = 0  # 0: only at the end (when `checkpoints` is given)
    checkpoint_state: dict[str, Any] = field(default_factory=dict)  # saved in trainer.json
    metrics: MetricsLogger | None = None
    max_bad_steps: int = 5
    tokens_per_step: int | None = None  # logged as tokens_per_s
    progress: str | None = None  # a tqdm bar's description; None: no bar
    log: Callable[[str], None] = print
    skipped_steps: int = 0  # over the whole run, resumed runs included
    last_eval: dict[str, float] | None = None

    def step(self, step: int) -> StepResult:
        """Optimizer step `step` (0-based): learning rate, batch, forward, backward, update."""
        self.lr = set_lr(self.optimizers, self.schedule(step))
        self.model.train(self.train_mode)
        return train_step(self.model, self.optimizers, self.batches(step), grad_accum=self.grad_accum,
                          grad_clip=self.grad_clip, dtype=self.dtype, logits_fn=self.logits_fn,
                          recomputes=self.recomputes, parallel=self.parallel, balance_moe=self.balance_moe)

    def run_eval(self, done: int) -> dict[str, float]:
        self.last_eval = self.evaluate()
        self._record({"kind": "eval", "step": done, **self.last_eval})
        return self.last_eval

    def checkpoint(self, done: int) -> None:
        """Save step `done`, unless the weights are not a good state to resume from."""
        if not all_finite(self.model, self.parallel):
            raise TrainingDiverged(f"stopped at step {done}: the weights hold NaN or infinity although every step's "
                                   "loss and gradient norm were finite; the newest checkpoint stays the last good "
                                   "one; resume from it with a lower --lr")
        self.checkpoints.save(done, self.model, self.optimizers,
                              {**self.checkpoint_state, "skipped_steps": self.skipped_steps},
                              distributed=self.parallel is not None)

    def fit(self, start: int = 0) -> None:
        """Steps `start` .. max_steps - 1. Raises `TrainingDiverged` after `max_bad_steps`
        non-finite steps in a row (the newest checkpoint stays good)."""
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.max_steps, initial=start, desc=self.progress, unit="step", dynamic_ncols=True)
        say = bar.write if bar is not None else self.log
        bad_streak = 0
        try:
            for step in range(start, self.max_steps):
                t0 = time.perf_counter()
                result = self.step(step)
                done = step + 1
                self.skipped_steps += result.skipped
                bad_streak = bad_streak + 1 if result.skipped else 0
                record = {"kind": "train", "step": done, "loss": result.loss, "lr": self.lr,
                          "grad_norm": result.grad_norm, "skipped": result.skipped,
                          "skipped_steps": self.skipped_steps, **result.balance}
                seconds = time.perf_counter() - t0
                record.update({"tokens_per_s": self.tokens_per_step / seconds} if self.tokens_per_step
                              else {"s_per_step": seconds})
                self._record(record)
                if result.skipped:
                    say(f"step {done}: loss {result.loss}, gradient norm {result.grad_norm}: skipped "
                        f"({bad_streak} in a row, the run stops at {self.max_bad_steps})")
                if bad_streak >= self.max_bad_steps:
                    self._diverged(done, bad_streak)
                last = done == self.max_steps
                if self.evaluate is not None and (last or (self.eval_every and done % self.eval_every == 0)):
                    ev = self.run_eval(done)
                    say(f"step {done}: val loss {ev['val_loss']:.4f}"
                        + (f", {ev['val_bpb']:.3f} bits/byte" if "val_bpb" in ev else ""))
                if self.checkpoints is not None and (last or (self.checkpoint_every
                                                              and done % self.checkpoint_every == 0)):
                    if bad_streak:  # the last step was skipped: the newest checkpoint stays the last good state
                        say(f"step {done}: no checkpoint (the step was skipped)")
                    else:
                        self.checkpoint(done)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{result.loss:.3f}")
        finally:
            if bar is not None:
                bar.close()
            if self.metrics is not None:
                self.metrics.close()

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.log(record)

    def _diverged(self, done: int, streak: int) -> None:
        newest = (latest_good_checkpoint(self.checkpoints.run_dir, warn=self.log)
                  if self.checkpoints is not None else None)
        raise TrainingDiverged(
            f"stopped at step {done}: {streak} steps in a row had a non-finite loss or gradient norm; the newest "
            f"good checkpoint is {newest or 'none (no checkpoint was written yet)'}; resume from it with a lower "
            "--lr (or fix the data), or allow more with --max-bad-steps")
