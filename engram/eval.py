"""The one held-out loss loop, for training, `engram eval`, retrofit, memory edits and the
experiments: mean next-token cross-entropy over windows, summed in float64.

A window is a [B, T + 1] id tensor: inputs [:, :-1], targets [:, 1:]. Windows may differ in
length (texts of a memory edit are one window each).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .device import autocast
from .precision import upcast


@torch.no_grad()
def held_out_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], windows: Sequence[torch.Tensor], *,
                  device: torch.device | str = "cpu", dtype: str = "fp32", parallel=None) -> tuple[float, int]:
    """(mean cross-entropy, target count) of `logits_fn` over `windows`.

    With `parallel` (`engram.distributed.Parallel`) the windows are dealt out to the ranks and
    the sums added up; every rank runs the same number of forwards (a sharded table's lookup is
    a collective), the last ones repeating a window that is not counted where the windows do
    not divide evenly."""
    device = torch.device(device)
    work = [(w, True) for w in windows]
    if parallel is not None and work:
        W, rank = parallel.world_size, parallel.rank
        mine = work[rank::W]
        work = mine + [(work[0][0], False)] * (math.ceil(len(work) / W) - len(mine))
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for window, counts in work:
        window = window.to(device)
        with autocast(device, dtype):
            logits = logits_fn(window[:, :-1])
        if counts:  # a repeat that only keeps this rank in step with the others adds nothing
            total += F.cross_entropy(upcast(logits.flatten(0, 1)), window[:, 1:].flatten(), reduction="sum")
            n += window[:, 1:].numel()
    sums = torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)])
    if parallel is not None:
        torch.distributed.all_reduce(sums, group=parallel.group)
    total, n = sums.tolist()
    if n == 0:
        raise ValueError("no targets to measure a loss on: every window is shorter than two tokens")
    return total / n, int(n)


def evaluate(model, data, seq_len: int, max_windows: int, *, dtype: str = "fp32", parallel=None) -> dict[str, float]:
    """Validation loss and bits per byte of an EngramLM over consecutive windows of a prepared
    dataset's validation split (in eval mode; the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    try:
        loss, n = held_out_loss(lambda ids: model(ids).logits, list(data.val.windows(seq_len, max_windows=max_windows)),
                                device=model.embed.weight.device, dtype=dtype, parallel=parallel)
    finally:
        model.train(was_training)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / data.bytes_per_token("val"), "val_tokens": n}
