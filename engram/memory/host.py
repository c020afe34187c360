"""Tables in host memory (`HostTable`): the rows stay in RAM while the module may live on a
GPU. Inference only: rows are a plain tensor, not a Parameter (no gradients).

Rows are read with `torch.index_select` on a CPU tensor (it releases the GIL, so a background
prefetch thread overlaps with the main thread) and moved to the device of `offsets`, i.e.
wherever the module lives. Outputs equal an `InMemoryTable`'s bit for bit. Memory-mapped
files (`disk_format.DiskTable`) and quantized tables gather the same way (`gather_rows`).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch

from .checkpoint_rows import CHUNK_BYTES, checkpoint_table
from .in_memory import InMemoryTable
from .table import MemoryTable


def gather_rows(rows_NE: torch.Tensor, flat_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """index_select on the CPU rows -> [*flat_ids.shape, E] on `device`. For an accelerator
    the rows are gathered into pinned memory so that the copy can be asynchronous."""
    idx = flat_ids.reshape(-1).to("cpu", torch.long)
    if device.type == "cpu":
        out = torch.index_select(rows_NE, 0, idx)
    else:
        out = torch.empty(idx.numel(), rows_NE.shape[1], dtype=rows_NE.dtype, pin_memory=True)
        torch.index_select(rows_NE, 0, idx, out=out)
        out = out.to(device, non_blocking=True)
    return out.view(*flat_ids.shape, rows_NE.shape[1])


def _copy_in_slices(dst_NE: torch.Tensor, read: Callable[[int, int], torch.Tensor],
                    chunk_bytes: int = CHUNK_BYTES) -> None:
    """Fill `dst_NE` with `read(start, stop)` -> rows [start, stop), ~`chunk_bytes` at a time, so
    that filling a host table never needs a second full-size copy of it."""
    rows, row_bytes = dst_NE.shape[0], max(1, dst_NE[:1].nbytes)
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        dst_NE[start:stop].copy_(read(start, stop))


def _pin_in_place(t: torch.Tensor) -> None:
    """Page-lock `t`'s memory where it is (cudaHostRegister) and unregister it when `t` dies.

    Chosen over `torch.empty(pin_memory=True)`: torch's pinned caching allocator rounds every
    allocation up to a power of two (CachingHostAllocator, unless pinned_max_round_threshold
    is set), so a 40 GiB table would lock 64 GiB of RAM; and it could not adopt the caller's
    tensor. This is how torch.distributed pins its staging buffers (torch.cuda._pin_memory_utils).
    """
    import weakref

    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.nbytes
    err = int(cudart.cudaHostRegister(ptr, nbytes, 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister of the {nbytes / 2**30:.2f} GiB host table failed (cudaError {err}); "
                           "lower memlock limits (ulimit -l) or pass pin=False")
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)


class HostTable(MemoryTable):
    """All heads in one CPU tensor [sum(table_sizes), E]; the module may live on a GPU.

    `weight` is a plain tensor, not a Parameter or buffer: it gets no gradients, is not in the
    state_dict and stays in host memory when the module moves (`.to("cuda")`). There is only
    ever one host copy of the rows: a contiguous CPU `weight` is used as is (it shares memory
    with the caller's tensor); any other (on a GPU, or strided) is copied into one new CPU
    tensor slice by slice. With `pin` (default: when CUDA is available) that tensor is
    page-locked in place (cudaHostRegister), so row copies to the GPU are asynchronous.
    """

    asynchronous = True  # rows live off the compute device: `prefetch` fetches them in the background

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, weight: torch.Tensor,
                 device: torch.device | str | None = None, *, pin: bool | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(table_sizes, embedding_dim, device=device)
        if tuple(weight.shape) != (self.num_rows, self.embedding_dim):
            raise ValueError(f"weight has shape {tuple(weight.shape)}, expected "
                             f"{(self.num_rows, self.embedding_dim)} (sum(table_sizes) x embedding_dim)")
        pin = torch.cuda.is_available() if pin is None else pin
        if pin and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (pinned memory only speeds up copies to a GPU); pass pin=False")
        weight = weight.detach()
        if weight.device.type != "cpu" or not weight.is_contiguous():
            host = torch.empty(weight.shape, dtype=weight.dtype)
            _copy_in_slices(host, lambda a, b: weight[a:b], chunk_bytes)
            weight = host
        if pin and not weight.is_pinned():
            _pin_in_place(weight)
        self.weight, self.pinned = weight, bool(pin)

    @classmethod
    def from_table(cls, table: InMemoryTable, *, pin: bool | None = None) -> "HostTable":
        """A host table of an in-memory table's rows, for a module on the table's device. A CPU
        table's memory is shared, not copied: clone it first if it will still change."""
        return cls(table.table_sizes, table.embedding_dim, table.weight, device=table.offsets.device, pin=pin)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, layer_id: int, *,
                        table_sizes: Sequence[int] | None = None, pin: bool | None = None,
                        chunk_bytes: int = CHUNK_BYTES, device: torch.device | str | None = None) -> "HostTable":
        """Read `blocks.{layer_id}.engram.table.weight` of a model folder straight into the host
        table, ~`chunk_bytes` at a time (one host copy in all). `table_sizes` default to the
        folder's hash_layout.json. For `load_model(..., table_factory=...)`."""
        from safetensors import safe_open

        st_path, name, table_sizes = checkpoint_table(checkpoint_dir, layer_id, table_sizes)
        with safe_open(str(st_path), framework="pt") as f:
            piece = f.get_slice(name)
            rows, dim = piece.get_shape()
            host = torch.empty(rows, dim, dtype=piece[0:1].dtype)
            _copy_in_slices(host, lambda a, b: piece[a:b], chunk_bytes)
        return cls(table_sizes, dim, host, device=device, pin=pin)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        return gather_rows(self.weight, flat_ids, self.offsets.device)

    def extra_repr(self) -> str:
        return (f"heads={len(self.table_sizes)}, rows={self.num_rows}, dim={self.embedding_dim}, "
                f"dtype={self.weight.dtype}, pinned={self.pinned}")
