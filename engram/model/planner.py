"""Sparsity allocation (docs/paper.md "Sparsity allocation"): split a pure-MoE model's inactive
parameters between routed experts (share rho) and Engram tables (1 - rho), at equal total
and equal active parameters.

Cutting routed experts frees inactive parameters for the tables. Engram's dense projections
(and the few rows it reads) are active, so with `match_active=True` they are paid for by
trimming the shared experts' width; the paper's 27B pair differs by ~0.9% of active
parameters without that (its counts are rounded to 3.8B).
"""

from __future__ import annotations

import dataclasses
import math

from ..config import EngramConfig, ModelConfig
from .accounting import count_params


def default_engram_layers(n_layers: int) -> tuple[int, ...]:
    """The paper's placement scaled to depth: block 1 (its "layer 2") and mid-depth
    (27B: blocks 1 and 14 of 30, 0-based); one module for shallow models."""
    if n_layers < 2:
        return (0,)
    mid = n_layers // 2 - 1
    return (1,) if mid <= 1 else (1, mid)


def allocation(baseline: ModelConfig, planned: ModelConfig) -> dict[str, float]:
    """rho actually achieved and the total/active mismatch of `planned` against `baseline`."""
    b, p = count_params(baseline), count_params(planned)
    routed_inactive = p["routed_experts_params"] - p["active_routed_params"]
    table_inactive = p["engram_tables_params"] - p["engram_rows_read_params"]
    return {
        "rho": routed_inactive / (routed_inactive + table_inactive),
        "total_mismatch": p["total"] / b["total"] - 1, "active_mismatch": p["active"] / b["active"] - 1,
        "experts_before": b["routed_experts"], "experts_after": p["routed_experts"],
        "table_params": p["engram_tables_params"], "total": p["total"], "active": p["active"],
    }


def plan_sparsity(
    baseline: ModelConfig, rho: float, *, layer_ids: tuple[int, ...] | None = None,
    max_ngram_size: int = 3, n_head_per_ngram: int = 8, n_embed_per_ngram: int | None = None,
    compressed_vocab_size: int | None = None, pad_id: int = 0, match_active: bool = True,
    **engram_options,
) -> ModelConfig:
    """The Engram config with the baseline's total and active parameters and a share `rho` of
    the inactive budget left in routed experts (rho = 1 returns the baseline).

    Defaults follow the paper: Engram at `default_engram_layers`, N-grams {2, 3}, 8 heads per
    order, d_mem = (N-1) * hidden/4 (27B: 1280).
    """
    if baseline.moe is None or baseline.engram is not None:
        raise ValueError("plan_sparsity needs a pure-MoE baseline (moe set, engram=None), e.g. presets.moe_27b()")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho is the share of the inactive budget kept in routed experts: 0 < rho <= 1, got {rho}")
    if rho == 1.0:
        return baseline
    moe, D = baseline.moe, baseline.hidden_size
    spare = moe.n_routed_experts - moe.top_k  # inactive experts per MoE layer
    n_experts = moe.top_k + math.floor(rho * spare + 0.5)  # nearest whole expert, halves up
    if n_experts >= moe.n_routed_experts:
        raise ValueError(
            f"rho={rho} keeps all {moe.n_routed_experts} experts (steps are 1/{spare} = {1 / spare:.4f}); "
            f"use rho <= {1 - 0.5 / spare:.4f} to move at least one expert per layer into Engram"
        )
    if n_experts <= moe.top_k:
        raise ValueError(
            f"rho={rho} leaves {n_experts} routed experts for top_k={moe.top_k}: nothing would be inactive; "
            f"use rho >= {0.5 / spare:.4f}"
        )
    n_embed = n_embed_per_ngram or D // 4
    engram = EngramConfig(
        compressed_vocab_size=compressed_vocab_size or baseline.vocab_size, pad_id=pad_id,
        layer_ids=layer_ids or default_engram_layers(baseline.n_layers), max_ngram_size=max_ngram_size,
        n_head_per_ngram=n_head_per_ngram, rows_per_head=(2,) * (max_ngram_size - 1),
        n_embed_per_ngram=n_embed, **engram_options)
    planned = dataclasses.replace(
        baseline, moe=dataclasses.replace(moe, n_routed_experts=n_experts), engram=engram)

    base, draft = count_params(baseline), count_params(planned)
    if match_active:
        extra_active = draft["active"] - base["active"]
        per_unit = 3 * D * draft["n_moe_layers"]  # active params per unit of shared width
        shrink = math.ceil(extra_active / per_unit)
        width = moe.shared_width - shrink
        if moe.n_shared_experts == 0 or width < 1:
            raise ValueError(
                f"Engram adds {extra_active:,} active parameters and the shared experts (width "
                f"{moe.shared_width}) cannot pay for them; use match_active=False or a smaller "
                "n_embed_per_ngram"
            )
        planned = dataclasses.replace(planned, moe=dataclasses.replace(planned.moe, shared_hidden_size=width))
        draft = count_params(planned)

    n_tables = len(engram.layer_ids) * engram.n_hash_heads
    tiny_tables = draft["engram_tables_params"]  # the placeholder's tables (a few rows)
    budget = base["total"] - (draft["total"] - tiny_tables)
    rows = budget // (n_tables * engram.row_dim)
    if rows < 2:
        raise ValueError(f"rho={rho} leaves no parameters for the Engram tables (budget {budget:,})")
    # Primes land just above `rows`; start the search a little lower so the sum stays on budget.
    per_order = max(2, rows - n_head_per_ngram * int(math.log(rows)) // 2)
    return dataclasses.replace(planned, engram=dataclasses.replace(
        engram, rows_per_head=(per_order,) * (max_ngram_size - 1)))
