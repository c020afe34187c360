"""ShardedTable: one Engram table's rows split across the ranks of a process group.

Shape legend: N ids looked up on this rank, U of them unique, R rows in the whole table,
E row width, W ranks; "recv" = the ids other ranks asked this rank for.

Rank r owns the contiguous rows [r * C, min((r + 1) * C, R)) with C = ceil(R / W): the
boundaries of `torch.chunk` and of DTensor's `Shard(0)`, so a checkpoint saved as DTensor
reshards onto any world size. A lookup moves only the rows a step reads (docs/paper.md: the
all-to-all of the paper's row-sharded tables):

    forward   unique ids -> counts and ids to their owners (all_to_all_single) -> owners
              gather -> rows back (all_to_all_single) -> un-dedupe
    backward  summed gradient per unique id -> to the owner (all_to_all_single) -> a gradient
              of the local slice: sparse COO (sparse_adam / row_adam) or dense (Adam)

An owner receives the *sum* over ranks of the gradients of their local losses, while
data-parallel training averages (DDP, FSDP): the gradient is scaled by 1 / W so that W ranks
on a batch split W ways equal one process on the whole batch. Every rank must look up the
same number of times (a lookup is a collective): the training loop runs every forward on
every rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..memory.in_memory import InMemoryTable
from ..memory.table import MemoryTable


def row_block(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, end) of the rows `rank` owns: DTensor Shard(0) / torch.chunk boundaries (the
    last ranks may own fewer rows, or none)."""
    chunk = math.ceil(num_rows / world_size)
    start = min(rank * chunk, num_rows)
    return start, min(start + chunk, num_rows)


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat_ids: torch.Tensor, weight: torch.Tensor, table: "ShardedTable") -> torch.Tensor:
        group, W = table.group, table.world_size
        ids_N = flat_ids.reshape(-1)
        uniq_U, inverse_N = torch.unique(ids_N, sorted=True, return_inverse=True)  # sorted: owners contiguous
        owner_U = torch.div(uniq_U, table.rows_per_rank, rounding_mode="floor")
        send_W = torch.bincount(owner_U, minlength=W)
        recv_W = torch.empty_like(send_W)
        dist.all_to_all_single(recv_W, send_W, group=group)
        send, recv = send_W.tolist(), recv_W.tolist()  # the split sizes must be known on the host
        recv_ids = uniq_U.new_empty(sum(recv))
        dist.all_to_all_single(recv_ids, uniq_U, recv, send, group=group)
        local = recv_ids - table.row_start
        rows = weight.index_select(0, local)
        rows_UE = rows.new_empty(uniq_U.numel(), weight.shape[1])
        dist.all_to_all_single(rows_UE, rows, send, recv, group=group)
        ctx.save_for_backward(inverse_N, local)
        ctx.splits, ctx.table, ctx.n_unique = (send, recv), table, uniq_U.numel()
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return rows_UE.index_select(0, inverse_N).view(*flat_ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        inverse_N, local = ctx.saved_tensors
        (send, recv), table = ctx.splits, ctx.table
        E = ctx.weight_shape[1]
        # per unique id, summed in float32 at least (a bfloat16 table: one rounding per row)
        acc = torch.promote_types(grad_out.dtype, torch.float32)
        grad_UE = grad_out.new_zeros(ctx.n_unique, E, dtype=acc).index_add_(
            0, inverse_N, grad_out.reshape(-1, E).to(acc))
        grad_recv = grad_UE.new_empty(local.numel(), E)
        dist.all_to_all_single(grad_recv, grad_UE, recv, send, group=table.group)
        grad_recv = grad_recv.mul_(1.0 / table.world_size).to(ctx.weight_dtype)
        if table.sparse:  # rows asked by several ranks appear once per rank: coalescing sums them
            grad_w = torch.sparse_coo_tensor(local.unsqueeze(0), grad_recv, ctx.weight_shape, check_invariants=False)
        else:
            grad_w = grad_recv.new_zeros(ctx.weight_shape).index_add_(0, local, grad_recv)
        return None, grad_w, None


class ShardedTable(MemoryTable):
    """A `MemoryTable` whose rows are split across the ranks of `group` (default: the world).

    `weight` is this rank's slice [rows owned, E]; `row_start`/`row_end` say which rows. Build
    one from a whole table with `from_table` (each rank keeps its slice: the numbers equal the
    single-process model's), or directly (each rank draws its own slice). `sparse`: the slice's
    gradient is sparse COO (`sparse_adam`, `row_adam`) or dense (`adam`).
    """

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, *, sparse: bool = True,
                 group: dist.ProcessGroup | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ShardedTable needs torch.distributed: call init_process_group first "
                               "(engram.distributed.init_distributed under torchrun)")
        super().__init__(table_sizes, embedding_dim, device=device)
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.rows_per_rank = math.ceil(self.num_rows / self.world_size)
        self.row_start, self.row_end = row_block(self.num_rows, self.world_size, self.rank)
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(self.row_end - self.row_start, self.embedding_dim,
                                               device=device, dtype=dtype))
        self._lookup = torch.compiler.disable(_ShardedLookup.apply)  # host-side split sizes: never traced
        self.reset_parameters()

    @classmethod
    def from_table(cls, table: InMemoryTable, *, sparse: bool | None = None,
                   group: dist.ProcessGroup | None = None) -> "ShardedTable":
        """This rank's slice of a whole table (built the same way on every rank)."""
        weight = table.weight
        out = cls(table.table_sizes, table.embedding_dim, sparse=table.sparse if sparse is None else sparse,
                  group=group, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            out.weight.copy_(weight[out.row_start:out.row_end])
        out.validate_rows = table.validate_rows
        return out

    def reset_parameters(self) -> None:
        """N(0, 1) rows like `InMemoryTable`, drawn per rank from (the torch seed, rank): ranks
        built with the same seed still get independent rows. Not the single-process draw; use
        `from_table` for that."""
        super().reset_parameters()
        if self.weight.is_meta:
            return
        g = torch.Generator(device=self.weight.device).manual_seed(
            (torch.initial_seed() * 1_000_003 + self.rank) % (1 << 63))
        with torch.no_grad():
            self.weight.normal_(generator=g)

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(flat_ids, self.weight, self)

    def extra_repr(self) -> str:
        return (f"heads={len(self.table_sizes)}, rows={self.num_rows}, dim={self.embedding_dim}, "
                f"rank {self.rank}/{self.world_size} owns [{self.row_start}, {self.row_end}), sparse={self.sparse}")
