"""Where and in what precision a model computes: the device spec, compute dtypes, autocast.

Shared by training, evaluation and serving. Precision follows mixed-precision practice: `bf16`
runs the forward (and backward) under `torch.autocast` while the weights stay float32.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_dtype(name: str, what: str = "dtype") -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_device_spec(spec: str) -> None:
    """The syntax only (whether the device exists is `resolve_device`'s question)."""
    if not isinstance(spec, str) or not _DEVICE.match(spec):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")


def resolve_device(spec: str) -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU; `cuda[:N]` must exist."""
    check_device_spec(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec} was asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu (or auto), or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {spec} does not exist: this machine has {count} CUDA GPU(s), "
                             f"cuda:0..cuda:{count - 1}")
    return device


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """The compute precision of a forward: `fp32` changes nothing; `bf16` is torch.autocast
    (matmuls in bfloat16, reductions and the weights themselves in float32)."""
    if check_dtype(dtype) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


_warned_bf16_cpu = False


def bf16_cpu_is_slow() -> bool:
    """A CPU without native bfloat16 (no AVX512-BF16 / AMX): oneDNN then emulates it."""
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return True


def warn_if_slow(device: torch.device, dtype: str) -> None:
    """Say once per process that bf16 on this CPU is far slower than fp32 (measured on this
    project's 2-core machine: about 30x; docs/LOG.md)."""
    global _warned_bf16_cpu
    if dtype == "bf16" and device.type == "cpu" and not _warned_bf16_cpu and bf16_cpu_is_slow():
        _warned_bf16_cpu = True
        warnings.warn("--dtype bf16 on this CPU: it has no native bfloat16 (no AVX512-BF16 or AMX), so bf16 runs "
                      "emulated, about 30x slower than fp32 here; use --dtype fp32 on this machine", stacklevel=2)
