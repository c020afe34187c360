"""Row-sparse gradients of a table: the rows a step touched and their summed gradients.

Shape legend: R table rows, E row width, N rows touched (unique, after coalescing). Used by the
row-sparse optimizers (engram.train.optim) and by sharded tables (engram.distributed), which
both work on the touched rows only.
"""

from __future__ import annotations

import torch


def coalesce(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()` (duplicate rows summed, rows ascending), faster for row-sparse CPU
    gradients: there torch's coalesce sums in a serial loop (~10 ms for 65k draws of a 4M-row
    table, half a SparseRowAdam step), while unique + index_add_ takes ~1.5 ms. The sums may
    differ from torch's in the order of additions only. Elsewhere torch's own is used (on CUDA
    it is fast, and index_add_ there would add atomically, in no fixed order)."""
    if grad.is_coalesced() or grad.device.type != "cpu" or grad.sparse_dim() != 1:
        return grad.coalesce()
    rows_N, inverse = torch.unique(grad._indices()[0], return_inverse=True)
    values = grad._values()
    # sums in float32 (bfloat16 tables: one rounding per row instead of one per duplicate)
    acc = torch.float32 if values.dtype in (torch.bfloat16, torch.float16) else values.dtype
    values_NE = values.new_zeros((len(rows_N), *grad.shape[1:]), dtype=acc).index_add_(
        0, inverse, values.to(acc)).to(values.dtype)
    return torch.sparse_coo_tensor(rows_N.unsqueeze(0), values_NE, grad.shape, is_coalesced=True,
                                   check_invariants=False)


def touched_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_N, grad_NE): the touched rows (unique, ascending) and their summed gradients.

    Sparse COO (as from `F.embedding(..., sparse=True)`): a row read k times appears k times,
    coalescing sums them into the row's gradient. Dense: the rows with any nonzero element
    (a row that was read but got an exactly zero gradient then counts as untouched).
    """
    if grad.is_sparse:
        if grad.sparse_dim() != 1:
            raise ValueError(
                f"expected a row-sparse gradient (sparse_dim 1, values [N, E]) as F.embedding(sparse=True) "
                f"makes, got sparse_dim {grad.sparse_dim()}; pass it dense or build it with sparse_dim=1")
        grad = coalesce(grad)
        return grad.indices()[0], grad.values()
    if grad.layout != torch.strided:
        raise ValueError(f"gradients must be dense or sparse COO, got layout {grad.layout}")
    rows_N = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows_N, grad.index_select(0, rows_N)
