"""Optimizers for an Engram model: AdamW for the backbone, Adam for the tables, gradient clipping.

Shape legend: R table rows, E row width, N rows touched in a step (unique, after coalescing).

Why a row-sparse Adam: a step reads only B*T*H rows of a table that may hold billions, but
torch.optim.Adam reads and writes every row's value and both moments each step (and needs the
[R, E] gradient materialized). `SparseRowAdam` touches only the rows read: O(N * E) work and
memory traffic per step. The paper's recipe (docs/paper.md "Training recipe": tables use Adam at 5x
the backbone's learning rate, weight decay 0) is kept by `build_optimizers`.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..memory.sparse_rows import coalesce, touched_rows

TABLE_OPTIMIZERS = ("adam", "sparse_adam", "row_adam")


def _load_keeping_dtypes(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """`Optimizer.load_state_dict`, then the saved tensors again as they were: the base class
    casts every floating state tensor to its parameter's dtype, which would round a bfloat16
    table's float32 moments to bfloat16; step counts are moved to the parameter's device."""
    torch.optim.Optimizer.load_state_dict(opt, state_dict)
    for saved_group, group in zip(state_dict["param_groups"], opt.param_groups):
        for pid, p in zip(saved_group["params"], group["params"]):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor):
                    opt.state[p][key] = value.to(device=p.device, copy=True)


def closure_loss(closure):
    """An optimizer step's `closure` run with gradients on (its loss), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class _PerParameterOptimizer(torch.optim.Optimizer):
    """`step` runs the subclass's `_update(p, group)` on every parameter that has a gradient."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        raise NotImplementedError


class SparseRowAdam(_PerParameterOptimizer):
    """Adam for embedding tables [R, E] that updates only the rows whose gradient is present.

    A row is *touched* in a step when `touched_rows` lists it. Untouched rows keep their values
    and all their state bit for bit (lazy Adam: their moments do not decay, no weight decay).
    For a touched row r with summed gradient g [E] and k = r's touch count including this step
    (the per-row int32 `step`, so bias correction follows the row, not the global step):

        w_r <- w_r * (1 - lr * weight_decay)                          decoupled, AdamW's order
        m_r <- beta1 * m_r + (1 - beta1) * g                          [E]
        "full": v_r <- beta2 * v_r + (1 - beta2) * g**2               [E]
        "row":  v_r <- beta2 * v_r + (1 - beta2) * mean_j(g_j**2)     one scalar per row
        w_r <- w_r - lr / (1 - beta1**k) * m_r / (sqrt(v_r) / sqrt(1 - beta2**k) + eps)

    "full" is exactly what torch.optim.Adam (AdamW with weight decay) does for a row whose
    gradient is seen only at the steps it is touched; with every row touched every step it is
    dense Adam. torch.optim.SparseAdam differs: one global step count for bias correction, and
    no weight decay. "row" is row-wise Adam (as row-wise Adagrad for recommender embeddings):
    all elements of a row share one adaptive scale; with E = 1 it equals "full".

    State, float32 for float32 and lower-precision tables (float64 for float64 ones); the
    update is computed in that precision and the row rounded back to the parameter's dtype once:
        "full": exp_avg [R, E], exp_avg_sq [R, E], step [R] int32  -> 8 bytes/element + 4/row
        "row":  exp_avg [R, E], exp_avg_sq [R],    step [R] int32  -> 4 bytes/element + 8/row
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, moments: str = "full") -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, moments=moments)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        if g["moments"] not in ("full", "row"):
            raise ValueError(f"moments must be 'full' (lazy Adam) or 'row' (row-wise Adam), got {g['moments']!r}")
        if g["lr"] < 0 or g["eps"] < 0 or g["weight_decay"] < 0 or not all(0 <= b < 1 for b in g["betas"]):
            raise ValueError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={g['lr']}, "
                             f"eps={g['eps']}, weight_decay={g['weight_decay']}, betas={g['betas']}")
        for p in g["params"]:
            if p.dim() != 2:
                raise ValueError(f"SparseRowAdam updates tables [rows, dim], got a parameter of shape {tuple(p.shape)}; "
                                 "give the other parameters to another optimizer")

    def _update(self, p: torch.Tensor, group: dict) -> None:
        rows_N, grad_NE = touched_rows(p.grad)
        if rows_N.numel() == 0:
            return
        state, full = self.state[p], group["moments"] == "full"
        if not state:
            R, E = p.shape
            state["step"] = torch.zeros(R, dtype=torch.int32, device=p.device)
            acc = torch.promote_types(p.dtype, torch.float32)  # float32, or float64 for a float64 table
            state["exp_avg"] = torch.zeros(R, E, dtype=acc, device=p.device)
            state["exp_avg_sq"] = torch.zeros((R, E) if full else (R,), dtype=acc, device=p.device)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]

        step_N = state["step"].index_select(0, rows_N) + 1
        state["step"].index_copy_(0, rows_N, step_N)
        # bias corrections per row, in float64 as torch.optim.Adam computes them (Python floats)
        k_N1 = step_N.to(torch.float64).unsqueeze(1)
        acc = state["exp_avg"].dtype
        neg_step_size_N1 = (-lr / (1 - beta1 ** k_N1)).to(acc)
        bc2_sqrt_N1 = (1 - beta2 ** k_N1).sqrt().to(acc)

        g_NE = grad_NE.to(acc)
        m_NE = state["exp_avg"].index_select(0, rows_N).lerp_(g_NE, 1 - beta1)
        if full:
            v_NE = state["exp_avg_sq"].index_select(0, rows_N).mul_(beta2).addcmul_(g_NE, g_NE, value=1 - beta2)
            denom_NE = (v_NE.sqrt() / bc2_sqrt_N1).add_(eps)
        else:
            v_N = state["exp_avg_sq"].index_select(0, rows_N).mul_(beta2).add_(g_NE.square().mean(1), alpha=1 - beta2)
            denom_NE = (v_N.sqrt().unsqueeze(1) / bc2_sqrt_N1).add_(eps)  # [N, 1], broadcast over E
        w_NE = p.index_select(0, rows_N).to(acc)
        if wd:
            w_NE.mul_(1 - lr * wd)
        w_NE.addcdiv_(m_NE * neg_step_size_N1, denom_NE)

        state["exp_avg"].index_copy_(0, rows_N, m_NE)
        state["exp_avg_sq"].index_copy_(0, rows_N, v_NE if full else v_N)
        p.index_copy_(0, rows_N, w_NE.to(p.dtype))

    def load_state_dict(self, state_dict: dict) -> None:
        _load_keeping_dtypes(self, state_dict)


class Float32StateAdam(_PerParameterOptimizer):
    """torch.optim.Adam for parameters stored in low precision (bfloat16 tables): the moments
    are float32 and the update is computed in float32, the parameter is rounded once per step.
    torch.optim.Adam would keep bfloat16 moments (exp_avg_sq of a small gradient underflows
    there) and round every intermediate. For float32 parameters it is torch.optim.Adam
    (foreach=False) operation for operation. `weight_decay` is Adam's L2 term, as in torch.
    Rows are updated in chunks of `chunk_rows`, which bounds the float32 temporaries.

    State: exp_avg, exp_avg_sq float32 of the parameter's shape (8 bytes/element), step (int).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, chunk_rows: int = 1 << 16) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"need lr, eps, weight_decay >= 0 and betas in [0, 1), got lr={lr}, eps={eps}, "
                             f"weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.chunk_rows = chunk_rows

    def _update(self, p: torch.Tensor, group: dict) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if p.grad.is_sparse:
            raise ValueError("Float32StateAdam takes dense gradients; use SparseRowAdam for sparse ones")
        state = self.state[p]
        if not state:
            state["step"] = 0
            acc = torch.promote_types(p.dtype, torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=acc, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        step_size, bc2_sqrt = lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5
        rows = [...] if p.dim() == 0 else [slice(i, i + self.chunk_rows)
                                           for i in range(0, p.shape[0], self.chunk_rows)]
        for r in rows:  # chunks of rows: views into the parameter and its state
            acc = state["exp_avg"].dtype
            w, g = p[r].to(acc), p.grad[r].to(acc)  # parameters already in `acc`: views, updated in place
            if wd:
                g = g.add(w, alpha=wd)
            m, v = state["exp_avg"][r], state["exp_avg_sq"][r]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            w.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)
            p[r].copy_(w)

    def load_state_dict(self, state_dict: dict) -> None:
        _load_keeping_dtypes(self, state_dict)


def build_optimizers(model, *, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                     table_lr_multiplier: float = 5.0, table_optimizer: str = "adam") -> list[torch.optim.Optimizer]:
    """[AdamW over the backbone, then the tables' optimizer (only when the model has Engram)].

    Groups come from `model.param_groups` (backbone matrices decayed; norms, biases, embeddings
    not). The tables follow the paper: lr x `table_lr_multiplier`, weight decay 0, with
    "adam": torch.optim.Adam (dense state and gradients; `Float32StateAdam` when the tables are
    stored in bfloat16, so the moments stay float32), "sparse_adam": SparseRowAdam(moments="full"),
    "row_adam": SparseRowAdam(moments="row"). The optimizer decides the tables' gradients: the
    row-sparse ones switch them to sparse gradients (only the rows read), Adam to dense ones.
    Step and zero every optimizer in the list each iteration.
    """
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"table_optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {table_optimizer!r}")
    if hasattr(model, "use_sparse_table_grads"):
        model.use_sparse_table_grads(table_optimizer != "adam")
    groups = model.param_groups(lr, weight_decay, table_lr_multiplier, table_weight_decay=0.0)
    backbone = [g for g in groups if g["name"] != "engram_tables"]
    tables = [g for g in groups if g["name"] == "engram_tables"]
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(backbone, lr=lr, betas=betas, weight_decay=weight_decay)]
    if tables:
        table_lr = lr * table_lr_multiplier
        if table_optimizer == "adam" and all(p.dtype == torch.float32 for g in tables for p in g["params"]):
            optimizers.append(torch.optim.Adam(tables, lr=table_lr, betas=betas, weight_decay=0.0))
        elif table_optimizer == "adam":  # tables stored in bfloat16: float32 moments all the same
            optimizers.append(Float32StateAdam(tables, lr=table_lr, betas=betas, weight_decay=0.0))
        else:
            moments = "full" if table_optimizer == "sparse_adam" else "row"
            optimizers.append(SparseRowAdam(tables, lr=table_lr, betas=betas, weight_decay=0.0, moments=moments))
    return optimizers


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float) -> float:
    """Global L2 norm of all gradients, dense and sparse COO; when it exceeds `max_norm` every
    gradient is scaled in place by max_norm / (norm + 1e-6). Returns the norm before clipping.

    Why not torch.nn.utils.clip_grad_norm_: it takes each gradient's norm with
    torch.linalg.vector_norm, which has no sparse COO kernel (NotImplementedError on torch 2.13).
    And the norm of an uncoalesced sparse gradient's values would be wrong: a row read twice
    holds two value rows whose *sum* is its gradient. So sparse gradients are coalesced (stored
    back coalesced, which the optimizers then reuse) and each row's values count once.
    A non-finite norm is returned as is and nothing is scaled (skip the step on it).
    """
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = coalesce(p.grad)
            grads.append(p.grad.values())  # a view: scaling it scales the sparse gradient
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)).to(device)
             for g in grads]
    total = float(torch.linalg.vector_norm(torch.stack(norms)))
    if total > max_norm and total != float("inf"):
        for g in grads:
            g.mul_(max_norm / (total + 1e-6))
    return total
