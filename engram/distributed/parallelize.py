"""Data-parallel training of an `EngramLM`, applied from outside (torchtitan's way).

    parallel = parallelize(model, fsdp=False)   # after init_process_group, before optimizers

- Engram tables: each replaced by a `ShardedTable` holding this rank's rows (all-to-all
  lookups; gradients reach only the owners).
- Backbone: DDP (replicated weights, gradients all-reduced) or FSDP2 (`fsdp=True`: weights,
  gradients and optimizer state sharded per block), both with the tables excluded.
- `Parallel` holds what one optimizer step needs beyond the plain model: the forward to call,
  gradient sync only on the last micro-batch, the mean loss, the global gradient norm (tables'
  and FSDP shards' squares all-reduced) and the MoE load counts summed over ranks.

W ranks on a batch split W ways then take the same step as one process on the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ..memory.in_memory import InMemoryTable
from ..memory.sparse_rows import coalesce
from .sharded_table import ShardedTable


def shard_tables(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> dict[int, ShardedTable]:
    """Replace every Engram layer's table by this rank's `ShardedTable` slice of it."""
    out = {}
    for layer in model.engram_layers:
        table = model.blocks[layer].engram.table
        if isinstance(table, ShardedTable):
            out[layer] = table
            continue
        if not isinstance(table, InMemoryTable):
            raise ValueError(f"block {layer}'s table is a {type(table).__name__}; sharding needs the whole table "
                             "in memory (InMemoryTable) to take each rank's rows from")
        out[layer] = ShardedTable.from_table(table, group=group)
        model.set_table(layer, out[layer])
    return out


@dataclass
class Parallel:
    """A parallelized model and the collectives of one training step around it."""

    model: nn.Module  # the EngramLM (FSDP2 changes it in place; DDP wraps it)
    forward_module: nn.Module  # what to call: the DDP wrapper, or the model itself
    fsdp: bool
    group: dist.ProcessGroup | None = None
    tables: dict[int, ShardedTable] = field(default_factory=dict)
    # Replicated parameters neither DDP nor FSDP2 reduces (FSDP2 takes no 0-dim parameters,
    # such as the hyper-connections' gating factors): their gradients are averaged here.
    unmanaged: list[nn.Parameter] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def logits(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return self.forward_module(ids_BT).logits

    def micro_batch(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradient accumulation: the backbone's gradients are reduced on the last micro-batch
        only (the tables' always move, inside their lookups)."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.forward_module.no_sync()

    def mean(self, value: torch.Tensor) -> float:
        """The mean over ranks of a scalar (each rank's loss of its share of the batch)."""
        value = value.detach().to(torch.float64).clone()
        dist.all_reduce(value, group=self.group)
        return value.item() / self.world_size

    def sum_moe_loads(self) -> None:
        """Sum each MoE layer's expert load counts over ranks, so the router biases move as
        one process on the whole batch would move them."""
        for moe in self.model.moe_layers():
            dist.all_reduce(moe.expert_load, group=self.group)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """`engram.train.optim.clip_grad_norm` over the whole model: replicated gradients (DDP)
        count once, sharded ones (the tables' slices, FSDP2's DTensors) are summed over ranks."""
        self._average_unmanaged_grads()
        table_params = {id(t.weight) for t in self.tables.values()}
        replicated, sharded = [], []
        for p in self.model.parameters():
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor):
                sharded.append(p.grad.to_local())
            elif p.grad.is_sparse:
                p.grad = coalesce(p.grad)  # a row several ranks asked for holds one value per rank
                sharded.append(p.grad.values())
            else:
                (sharded if id(p) in table_params else replicated).append(p.grad)
        device = next(self.model.parameters()).device
        sq = torch.zeros(2, dtype=torch.float64, device=device if device.type != "meta" else None)
        for i, grads in enumerate((replicated, sharded)):
            for g in grads:
                sq[i] += torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).double().square()
        dist.all_reduce(sq[1:], group=self.group)
        total = math.sqrt(sq.sum().item())
        if total > max_norm and math.isfinite(total):
            for g in replicated + sharded:
                g.mul_(max_norm / (total + 1e-6))
        return total


    def _average_unmanaged_grads(self) -> None:
        grads = [p.grad for p in self.unmanaged if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.group)
        flat /= self.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def parallelize(model: nn.Module, *, fsdp: bool = False, group: dist.ProcessGroup | None = None) -> Parallel:
    """Shard the tables and wrap the backbone (DDP, or FSDP2 with `fsdp=True`) of a model
    built identically on every rank (same seed, same device). Call before building the
    optimizers: FSDP2 replaces the backbone's parameters by sharded ones."""
    if not dist.is_initialized():
        raise RuntimeError("parallelize needs torch.distributed; call engram.distributed.init_distributed() "
                           "(under torchrun) or torch.distributed.init_process_group first")
    tables = shard_tables(model, group=group)
    ignored = {t.weight for t in tables.values()}
    device = next(p for p in model.parameters() if p not in ignored).device
    if fsdp:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        mesh = DeviceMesh(device.type, ranks)
        scalars = [p for p in model.parameters() if p.dim() == 0]
        ignored |= set(scalars)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, ignored_params=ignored & set(block.parameters()))
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return Parallel(model=model, forward_module=model, fsdp=True, group=group, tables=tables, unmanaged=scalars)
    from torch.nn.parallel import DistributedDataParallel as DDP

    names = [name for name, p in model.named_parameters() if p in ignored]
    DDP._set_params_and_buffers_to_ignore_for_model(model, names)
    # Buffers are synced once, at construction (equal by construction anyway), never in the
    # forward: the MoE loads are summed by `sum_moe_loads` after the backward instead.
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
              forward_sync_buffers=False)
    return Parallel(model=model, forward_module=ddp, fsdp=False, group=group, tables=tables)
