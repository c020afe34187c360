"""Precision helper shared by the model, the Engram module and the training loop."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: bf16/fp16 go up to float32 (sensitive reductions and logits), float32
    stays as is (no copy), float64 is kept (`.float()` would round it, and float64 runs are
    the exactness tests of distributed and chunked computations)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
