"""Checkpoints of distributed runs: torch.distributed.checkpoint (DCP), resharded on load.

A checkpoint folder `checkpoints/step_XXXXXXXX/` holds:
    dcp/             the DCP files: model weights, optimizer state, the torch RNG
    config.json, hash_layout.json   the model (as in a single-process checkpoint)
    optimizer.json   each optimizer's type, hyper-parameters and scalar state, by parameter name
    trainer.json     step, seed, world size, ...
    checksums.json   sha256 of every other file, written last
DCP's own file format (its tensors load through torch's weights-only unpickler; DCP's
safetensors mode has no reader for resharding in torch 2.13). Every sharded tensor is saved as a DTensor `Shard(0)` of its global shape: a table's rows and
its row-wise optimizer state (`ShardedTable` keeps DTensor's row boundaries), FSDP2's
parameters and their Adam moments. So the same checkpoint loads on any number of ranks, and
in one process without a process group (full tensors), for `engram eval|generate|...`.

Written like single-process checkpoints: into a temporary folder, every file and the folder
fsynced, renamed into place by rank 0 after every rank has written; a checkpoint whose
checksums do not verify is skipped on resume.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..model.io import write_model_files
from ..runs import DCP_DIR, CheckpointError, finish_checkpoint, is_distributed_checkpoint, new_checkpoint_dir
from .runtime import broadcast_object, is_main

def _tables_by_param(model: nn.Module) -> dict[int, Any]:
    """id(table weight) -> its ShardedTable, for the model's sharded tables."""
    from .sharded_table import ShardedTable

    out = {}
    for layer in getattr(model, "engram_layers", []):
        table = model.blocks[layer].engram.table
        if isinstance(table, ShardedTable):
            out[id(table.weight)] = table
    return out


def _mesh(device: torch.device):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh(device.type, list(range(dist.get_world_size())))


def _as_row_shard(local: torch.Tensor, table, mesh) -> torch.Tensor:
    """A table's slice (or a row-shaped state tensor of it) as the DTensor Shard(0) of its
    global shape (rows of the whole table first)."""
    from torch.distributed.tensor import DTensor, Shard

    shape = torch.Size((table.num_rows, *local.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def reshard(model: nn.Module) -> None:
    """Put FSDP2's sharded parameters back in place (a forward without backward, as in
    evaluation, leaves the root's parameters gathered), so names map to the optimizer's."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def training_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list[dict]]:
    """(tensors for DCP, JSON-able optimizer metadata). Keys: `model.<name>`,
    `optim.<i>.<parameter name>.<state key>`, `rng.torch`."""
    reshard(model)
    tables = _tables_by_param(model)
    mesh = _mesh(next(model.parameters()).device) if tables and dist.is_initialized() else None
    names = _param_names(model)
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        state[f"model.{name}"] = tensor
    for p in model.parameters():
        if id(p) in tables:
            state[f"model.{names[id(p)]}"] = _as_row_shard(p.detach(), tables[id(p)], mesh)
    meta = []
    for i, opt in enumerate(optimizers):
        groups, scalars = [], {}
        for group in opt.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [names[id(p)] for p in group["params"]]})
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if not isinstance(value, torch.Tensor):
                        scalars.setdefault(names[id(p)], {})[key] = value
                    elif id(p) in tables and value.dim() > 0:
                        state[f"optim.{i}.{names[id(p)]}.{key}"] = _as_row_shard(value, tables[id(p)], mesh)
                    else:
                        state[f"optim.{i}.{names[id(p)]}.{key}"] = value
        meta.append({"type": type(opt).__name__, "param_groups": groups, "scalars": scalars})
    state["rng.torch"] = torch.get_rng_state()
    return state, meta


def save_distributed_checkpoint(run_dir: str | Path, step: int, model: nn.Module,
                                optimizers: list[torch.optim.Optimizer], trainer_state: dict[str, Any],
                                keep_last: int = 3) -> Path:
    """Every rank calls this; rank 0 finishes the folder. Returns the checkpoint's path."""
    tmp = Path(broadcast_object(str(new_checkpoint_dir(run_dir, step)) if is_main() else None))
    try:
        state, meta = training_state(model, optimizers)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp / DCP_DIR), sync_files=True))
        final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
        if is_main():
            write_model_files(model, tmp, weights=False)
            (tmp / "optimizer.json").write_text(json.dumps(meta))
            world = dist.get_world_size() if dist.is_initialized() else 1
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "world_size": world, **trainer_state},
                                                         indent=1))
            finish_checkpoint(tmp, run_dir, step, keep_last)  # after every rank wrote (dcp.save ends in a barrier)
        if dist.is_initialized():
            dist.barrier()
    except BaseException:
        if is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _target_like(saved_meta, current: torch.Tensor | None, table, mesh) -> torch.Tensor:
    """A tensor to load a saved entry into: shaped for this rank's share, on this rank's
    device (zeros; DCP fills it)."""
    from torch.distributed.tensor import DTensor

    shape, dtype = tuple(saved_meta.size), saved_meta.properties.dtype
    if current is not None and isinstance(current, DTensor) and tuple(current.shape) == shape:
        return torch.zeros_like(current, dtype=dtype)
    device = current.device if current is not None else None
    if table is not None and mesh is not None and len(shape) > 0 and shape[0] == table.num_rows:
        local = torch.zeros((table.row_end - table.row_start, *shape[1:]), dtype=dtype, device=device)
        return _as_row_shard(local, table, mesh)
    return torch.zeros(shape, dtype=dtype, device=device)


def load_training_state(path: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Load a distributed checkpoint into `model` and `optimizers` built as for the run (any
    world size, or one process without a process group): weights, optimizer state, RNG."""
    path = Path(path)
    reader = dcp.FileSystemReader(str(path / DCP_DIR))
    saved = reader.read_metadata().state_dict_metadata
    meta = json.loads((path / "optimizer.json").read_text())
    if len(meta) != len(optimizers) or any(m["type"] != type(o).__name__ for m, o in zip(meta, optimizers)):
        raise CheckpointError(f"{path} holds optimizers {[m['type'] for m in meta]}, this run builds "
                              f"{[type(o).__name__ for o in optimizers]}; resume with the same --table-optimizer")
    tables = _tables_by_param(model)
    mesh = _mesh(next(model.parameters()).device) if tables and dist.is_initialized() else None
    params = dict(model.named_parameters())
    state, _ = training_state(model, [])  # the model's entries, shaped for this rank
    missing = [k for k in state if k not in saved]
    if missing:
        raise CheckpointError(f"{path} does not hold {missing[:3]}... (another model config); resume with the run's "
                              "own --preset or --config")
    for key, entry in saved.items():
        if not key.startswith("optim."):
            continue
        i, rest = key[len("optim."):].split(".", 1)
        name, state_key = rest.rsplit(".", 1)
        if name not in params:
            raise CheckpointError(f"{path}: optimizer state for {name!r}, which this model does not have")
        p = params[name]
        current = optimizers[int(i)].state.get(p, {}).get(state_key)
        state[key] = _target_like(entry, current if current is not None else (p if entry.size == p.shape else None),
                                  tables.get(id(p)), mesh)
    # In place: the model's entries are its own tensors (a table's DTensor wraps its slice
    # without a copy), so loading them loads the model.
    with warnings.catch_warnings():  # without a process group DCP warns that it loads in one process: it does
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=not dist.is_initialized())
    torch.set_rng_state(state["rng.torch"])
    loaded: dict[tuple[int, str], dict[str, torch.Tensor]] = {}  # (optimizer, parameter) -> its state tensors
    for key, value in state.items():
        if key.startswith("optim."):
            i, rest = key[len("optim."):].split(".", 1)
            name, state_key = rest.rsplit(".", 1)
            loaded.setdefault((int(i), name), {})[state_key] = value
    for i, (opt, m) in enumerate(zip(optimizers, meta)):
        for saved_group, group in zip(m["param_groups"], opt.param_groups):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            for name in saved_group["params"]:
                p = params[name]
                st = dict(m["scalars"].get(name, {}))
                for key, value in loaded.get((i, name), {}).items():
                    st[key] = value.to_local() if id(p) in tables else value
                if st:
                    opt.state[p] = st


class DCPFormat:
    """The sharded format of `engram.runs.Checkpoints`: every rank saves its shards; a load
    reshards for this world size (or loads whole tensors in one process)."""
    save = staticmethod(save_distributed_checkpoint)
    load = staticmethod(load_training_state)


DCP = DCPFormat()
__all__ = ["DCP", "is_distributed_checkpoint", "save_distributed_checkpoint", "load_training_state"]
