"""How training runs: table precision, activation checkpointing, torch.compile, memory fit.

Every helper here is applied to a plain `EngramLM` from outside; the model code knows nothing
of them. Precision follows mixed-precision practice: `bf16` runs the forward and backward under
`torch.autocast` while the weights, their gradients and the optimizer state stay float32
("master weights"); only the Engram tables may be *stored* in bfloat16 (`cast_tables`), which
halves the biggest tensors of the model.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..device import DTYPES, check_dtype

def cast_tables(model: nn.Module, dtype: str) -> None:
    """Store the Engram tables (only them) in `dtype`. The Engram module casts the rows it
    reads to the hidden states' dtype, so the rest of the model is unaffected."""
    target = check_dtype(dtype, "table dtype")
    for layer in getattr(model, "engram_layers", []):
        model.blocks[layer].engram.table.to(target)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each block keeps only its input for the backward and runs its
    forward again there (torch.utils.checkpoint, non-reentrant). Gradients are unchanged; the
    activations kept drop from every block's to one block's. Undo with `del block.forward`.

    Buffers a block changes while computing (the MoE load counts) would count twice, once in
    the recomputation: wrap the backward in `restore_buffers` (the training loop does)."""
    for block in model.blocks:
        if "forward" in vars(block):
            continue  # already wrapped
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


@contextlib.contextmanager
def restore_buffers(model: nn.Module, enabled: bool = True):
    """Put every buffer back as it was on entry (the backward of a checkpointed model reruns
    forwards, which would add the MoE load counts a second time)."""
    if not enabled:
        yield
        return
    saved = [(b, b.clone()) for b in model.buffers()]
    yield
    with torch.no_grad():
        for b, value in saved:
            b.copy_(value)


def compile_logits(model: nn.Module):
    """`ids -> model(ids).logits`, compiled with torch.compile (inductor). Compiling a function
    of the logits keeps the model's output dataclass out of the graph; the parameters are the
    model's own, so optimizers and checkpoints see no difference."""
    if torch.device(next(model.parameters()).device).type == "cpu" and not shutil.which(
            os.environ.get("CXX", "g++")) and not shutil.which("c++"):
        raise ValueError("--compile on the CPU needs a C++ compiler (g++ or clang) for inductor; install one, "
                         "or train without --compile")

    def logits(ids_BT: torch.Tensor) -> torch.Tensor:
        return model(ids_BT).logits

    return torch.compile(logits)


def memory_bytes(device: torch.device) -> int | None:
    """Total memory of a device (a GPU's, or the machine's RAM for the CPU); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def training_bytes(config, table_dtype: str = "fp32") -> int:
    """Weights + gradients + Adam's two float32 moments, the floor of what training needs
    (activations come on top): 16 bytes a parameter, 12 for a table element stored in bf16."""
    from ..model.accounting import count_params

    counts = count_params(config)
    tables = counts.get("engram_tables_params", 0)
    table_bytes = 2 * DTYPES[table_dtype].itemsize + 8
    return 16 * (counts["numel"] - tables) + table_bytes * tables


def fit_warning(config, device: torch.device, table_dtype: str = "fp32") -> str | None:
    """A warning when the model's training state alone exceeds the device's memory."""
    need, have = training_bytes(config, table_dtype), memory_bytes(device)
    if have is None or need <= have:
        return None
    return (f"warning: training this model needs at least {need / 2**30:,.1f} GiB (weights, gradients and Adam "
            f"state) but {device} has {have / 2**30:,.1f} GiB; expect to run out of memory (a smaller "
            "preset or --config, or --table-dtype bf16, needs less)")
