"""InMemoryTable: the default `MemoryTable`, all heads of a layer in one trainable parameter
on the module's device, with dense or row-sparse gradients (the table optimizer's choice)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .table import MemoryTable


class InMemoryTable(MemoryTable):
    """All heads in one parameter [sum(table_sizes), E] on the module's device."""

    def __init__(
        self, table_sizes: Sequence[int], embedding_dim: int, *, sparse: bool = False,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(table_sizes, embedding_dim, device=device)
        self.sparse = sparse
        self.weight = nn.Parameter(torch.empty(self.num_rows, self.embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def sparse(self) -> bool:
        """Row-sparse weight gradients (only the rows read): the table optimizer's choice
        (`EngramLM.use_sparse_table_grads`); dense by default."""
        return self._sparse

    @sparse.setter
    def sparse(self, on: bool) -> None:
        self._sparse = bool(on)
        if on:
            _sparse_lookup()  # wrapped now, eagerly, not first inside a compiled trace

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # N(0, 1) like nn.Embedding: each row starts as an independent random key.
        nn.init.normal_(self.weight)

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        if self.sparse and torch.is_grad_enabled() and self.weight.requires_grad:
            return _sparse_lookup()(flat_ids, self.weight)  # inference gathers compile in-graph
        return F.embedding(flat_ids, self.weight)

    def extra_repr(self) -> str:
        return f"heads={len(self.table_sizes)}, rows={self.num_rows}, dim={self.embedding_dim}, sparse={self.sparse}"


def _sparse_embedding(flat_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(flat_ids, weight, sparse=True)


_SPARSE_LOOKUP = None


def _sparse_lookup():
    """A lookup whose weight gradient is sparse (only the rows read), kept out of compiled
    graphs: inductor cannot hold sparse tensors, so under torch.compile the gather runs
    eagerly between two graphs (one break per Engram layer) and its gradient stays sparse.
    Dense tables, and any table under no_grad (decoding), compile into one graph. Wrapped on
    first use (a sparse table's construction): `torch.compiler.disable` imports dynamo, which
    `import engram` must not pay for."""
    global _SPARSE_LOOKUP
    if _SPARSE_LOOKUP is None:
        _SPARSE_LOOKUP = torch.compiler.disable(_sparse_embedding)
    return _SPARSE_LOOKUP
