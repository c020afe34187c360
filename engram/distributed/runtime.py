"""Process-group set-up for runs under torchrun: backend, device, timeouts, agreement checks.

`init_distributed()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), picks NCCL when the ranks have CUDA GPUs and gloo otherwise, and sets a timeout
so that a rank that dies or hangs turns into an error on the others instead of a hang.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


def launched_by_torchrun() -> bool:
    """True inside a process torchrun (or an equivalent launcher) started."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> torch.device:
    """Join the process group torchrun set up; returns this rank's device.

    `device`: auto (a GPU per rank when there are enough, else the CPU), cpu, or cuda (rank
    LOCAL_RANK's GPU). The backend follows the device: NCCL for CUDA, gloo for the CPU.
    `timeout_s` (default ENGRAM_DIST_TIMEOUT or 600 s) bounds every collective."""
    if not launched_by_torchrun():
        raise RuntimeError("not launched by torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set; run "
                           "torchrun --standalone --nproc-per-node=N -m engram train ...")
    dev = rank_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if timeout_s is None:
        timeout_s = float(os.environ.get("ENGRAM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return dev


def rank_device(device: str = "auto") -> torch.device:
    """This rank's device under torchrun: `auto` is GPU LOCAL_RANK when every local rank has
    one, else the CPU; `cuda` is GPU LOCAL_RANK; `cpu` the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()
                                     and torch.cuda.device_count() >= local_world):
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"rank {os.environ.get('RANK')} wants cuda:{local_rank}, but this machine has "
                               f"{torch.cuda.device_count()} GPU(s); start at most that many ranks per node")
        return torch.device("cuda", local_rank)
    if device in ("auto", "cpu"):
        return torch.device("cpu")
    raise ValueError(f"device must be auto, cpu or cuda under torchrun, got {device!r}")


def is_main() -> bool:
    """Rank 0, or a process without a process group: the one that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def check_same_on_all_ranks(what: str, value) -> None:
    """Raise on every rank unless `value` (JSON-able) is the same on all of them: configs that
    differ across ranks would train silently different models or deadlock later."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
    digests: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise ValueError(f"the {what} differs across ranks (ranks {differ} differ from rank 0); start every rank "
                         "with the same command, data and config")


def broadcast_object(value, src: int = 0):
    """`value` as rank `src` has it, on every rank (a no-op without a process group)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]
