"""Accounting from configs equals the built model's numel split; the planner keeps totals."""

import dataclasses

import pytest
import torch

from engram import EngramLM, allocation, count_params, param_counts, plan_sparsity, presets


def configs():
    base = presets.tiny()
    yield base
    yield presets.tiny(engram=False)
    yield presets.small()
    yield dataclasses.replace(base, tie_embeddings=True, moe=None)
    e = dataclasses.replace(base.engram, use_short_conv=False, use_gate=False, bias=True)
    yield dataclasses.replace(base, n_streams=2, engram=e, moe=dataclasses.replace(base.moe, shared_hidden_size=77))
    yield dataclasses.replace(base, moe=dataclasses.replace(base.moe, n_shared_experts=0, first_k_dense=0))


@pytest.mark.parametrize("config", list(configs()))
def test_config_counts_equal_the_built_model(config):
    model = EngramLM(config, device="meta")
    built, predicted = param_counts(model), count_params(config)
    assert built == predicted, {k: (built[k], predicted[k]) for k in built if built[k] != predicted[k]}
    assert built["numel"] == sum(p.numel() for p in model.parameters())


def test_active_counts_follow_the_paper_convention():
    c = presets.tiny()
    n = count_params(c)
    assert n["total"] == n["numel"] - n["embedding_params"] - n["lm_head_params"]
    routed = n["routed_experts_params"]
    assert n["active_routed_params"] == routed * 2 // 8  # top-2 of 8
    e = c.engram
    assert n["engram_rows_read_params"] == 1 * e.n_hash_heads * e.row_dim
    assert n["active"] == n["total"] - routed + n["active_routed_params"] - n["engram_tables_params"] \
        + n["engram_rows_read_params"]
    assert n["table_bytes_per_token_fp32"] == 4 * n["engram_rows_read_params"]
    assert n["routed_experts"] == 8 and n["n_moe_layers"] == 3


def test_paper_27b_shapes_on_the_meta_device():
    moe, eng = presets.moe_27b(), presets.engram_27b()
    for config in (moe, eng):
        model = EngramLM(config, device="meta")
        assert param_counts(model) == count_params(config)
    n_moe, n_eng = count_params(moe), count_params(eng)
    assert abs(n_moe["total"] - 26.2e9) < 0.1e9  # paper: 26.7B with MLA attention
    assert abs(n_eng["engram_tables_params"] - 5.79e9) < 0.01e9  # 2 x 16 x 2,262,400+ rows x 80
    assert abs(n_eng["total"] / n_moe["total"] - 1) < 0.005


def test_planner_reproduces_the_paper_27b_allocation():
    base = presets.moe_27b()
    plan = plan_sparsity(base, 0.743)
    a = allocation(base, plan)
    assert (a["experts_before"], a["experts_after"]) == (72, 55)
    assert abs(a["rho"] - 0.743) < 0.002
    assert 5.7e9 <= a["table_params"] <= 5.85e9  # paper: 5.7B (2,262,400 rows x 16 tables x 80 x 2)
    assert plan.engram.layer_ids == (1, 14) and plan.engram.memory_dim == 1280 and plan.engram.row_dim == 80
    assert abs(plan.engram.rows_per_head[0] - 2_262_400) / 2_262_400 < 0.01


@pytest.mark.parametrize("preset", ["moe_27b", "small", "tiny"])
def test_planner_is_iso_parameter_over_rho(preset):
    base = presets.moe_27b() if preset == "moe_27b" else presets.PRESETS[preset](engram=False)
    spare = base.moe.n_routed_experts - base.moe.top_k
    last = None
    for rho in (0.3, 0.4, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0):
        if rho < 1 and round(rho * spare) == spare:
            continue
        a = allocation(base, plan_sparsity(base, rho))
        assert abs(a["total_mismatch"]) <= 0.005 and abs(a["active_mismatch"]) <= 0.005, (rho, a)
        assert abs(a["rho"] - rho) <= 1 / spare, (rho, a["rho"])  # experts come in whole steps
        if last is not None:
            assert a["table_params"] <= last  # more rho, smaller tables
        last = a["table_params"]


def test_planner_errors():
    base = presets.moe_27b()
    with pytest.raises(ValueError, match="0 < rho <= 1"):
        plan_sparsity(base, 0.0)
    with pytest.raises(ValueError, match="keeps all 72 experts"):
        plan_sparsity(base, 0.995)
    with pytest.raises(ValueError, match="pure-MoE baseline"):
        plan_sparsity(presets.engram_27b(), 0.5)
    with pytest.raises(ValueError, match="nothing would be inactive"):
        plan_sparsity(base, 0.005)
    assert plan_sparsity(base, 1.0) is base


def test_planned_model_builds_and_runs():
    base = presets.tiny(engram=False)
    plan = plan_sparsity(base, 0.6)
    model = EngramLM(plan)
    assert param_counts(model) == count_params(plan)
    assert torch.isfinite(model(torch.randint(0, 8192, (1, 12))).logits).all()
