"""The training engine: devices, one exact optimizer step (gradient accumulation, activation
checkpointing, skipped non-finite steps), bf16 tables with float32 optimizer state."""

import copy

import pytest
import torch

from engram.model.transformer import EngramLM
from engram import device as device_
from engram.train import engine
from engram.train.loop import preset_config
from engram.train.trainer import train_step
from engram.train.optim import Float32StateAdam, SparseRowAdam, build_optimizers

V = 300


def tiny_model(sparse_grads=False, seed=0):
    torch.manual_seed(seed)
    return EngramLM(preset_config("tiny", vocab_size=V)).use_sparse_table_grads(sparse_grads).train()


def batch(B=8, T=16, seed=1):
    return torch.randint(0, V, (B, T + 1), generator=torch.Generator().manual_seed(seed))


def optimizers_for(model, table_optimizer):
    return build_optimizers(model, lr=3e-3, table_optimizer=table_optimizer)


def max_rel_diff(a: torch.nn.Module, b: torch.nn.Module) -> tuple[float, str]:
    worst, name = 0.0, ""
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        d = float((p.detach().float() - q.detach().float()).abs().max() / p.detach().float().abs().max().clamp_min(1e-12))
        if d > worst:
            worst, name = d, n
    return worst, name


def test_device_resolution():
    assert device_.resolve_device("cpu") == torch.device("cpu")
    assert device_.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "CPU", ""):
        with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
            device_.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA GPU; use --device cpu"):
            device_.resolve_device("cuda")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            device_.resolve_device(f"cuda:{torch.cuda.device_count()}")


def step_capturing_grads(model, table_optimizer, ids, grad_accum, eps):
    """train_step, returning its result and the (clipped) gradients the optimizers were given."""
    opts = optimizers_for(model, table_optimizer)
    for opt in opts:
        for group in opt.param_groups:
            group["eps"] = eps
    seen, step = {}, opts[0].step

    def capture(*args, **kwargs):
        seen.update({n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone()
                     for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    opts[0].step = capture
    return train_step(model, opts, ids, grad_accum=grad_accum), seen


@pytest.mark.parametrize("table_optimizer", ["adam", "sparse_adam"])
def test_grad_accum_gives_the_big_batch_update(table_optimizer, monkeypatch):
    """One step on 8 sequences equals 4 micro-batches of 2: the loss is the mean over all 8*T
    targets either way, so only the order of float additions differs.

    Gradients: equal to 2e-6 of each parameter's largest gradient (fp32 summation order;
    measured 6e-7). Weights after the step: equal to 1e-5 of each parameter's largest weight
    (measured 2.4e-6), with Adam's eps raised to 1e-3 for this test: at eps 1e-8 Adam's first
    step is lr * g / (|g| + 1e-8), which turns the rounding of a gradient near zero into a
    difference of up to 2 * lr, whichever way the batch is summed."""
    sparse = table_optimizer != "adam"
    ref, acc = tiny_model(sparse), tiny_model(sparse)
    ids = batch()
    calls = []
    monkeypatch.setattr(acc, "update_router_biases", lambda f=acc.update_router_biases: calls.append(1) or f())
    r1, g1 = step_capturing_grads(ref, table_optimizer, ids, 1, eps=1e-3)
    r4, g4 = step_capturing_grads(acc, table_optimizer, ids, 4, eps=1e-3)
    assert calls == [1], "router biases must move once per optimizer step, not per micro-batch"
    assert abs(r1.loss - r4.loss) < 1e-5, (r1.loss, r4.loss)
    assert abs(r1.grad_norm - r4.grad_norm) < 1e-5 * r1.grad_norm, (r1.grad_norm, r4.grad_norm)
    assert r1.balance == r4.balance  # the load counts of the 4 micro-batches add up to the batch's
    assert g1.keys() == g4.keys()
    for n in g1:
        d = float((g1[n] - g4[n]).abs().max() / g1[n].abs().max().clamp_min(1e-30))
        assert d < 2e-6, f"gradient of {n} differs by {d:.2e} of its largest element"
    worst, name = max_rel_diff(ref, acc)
    assert worst < 1e-5, f"{name} differs by {worst:.2e} of its largest magnitude"
    for m1, m4 in zip(ref.moe_layers(), acc.moe_layers()):
        assert torch.equal(m1.router_bias, m4.router_bias)


def grads(model, ids, recomputes=False):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    with engine.restore_buffers(model, enabled=recomputes):
        loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_gradients_and_load_counts():
    """Recomputation runs the same operations on the same inputs: gradients are equal to 1e-6
    relative (in practice bit for bit), and the MoE load counts are counted once, not twice."""
    plain, ckpt = tiny_model(), tiny_model()
    engine.checkpoint_blocks(ckpt)
    ids = batch()
    g_plain, g_ckpt = grads(plain, ids), grads(ckpt, ids, recomputes=True)
    assert g_plain.keys() == g_ckpt.keys()
    for n in g_plain:
        scale = g_plain[n].abs().max().clamp_min(1e-12)
        assert (g_plain[n] - g_ckpt[n]).abs().max() <= 1e-6 * scale, n
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers()):
        assert a.expert_load.sum() > 0 and torch.equal(a.expert_load, b.expert_load)
    # without restoring, the recomputation would count every token twice
    doubled = tiny_model()
    engine.checkpoint_blocks(doubled)
    grads(doubled, ids, recomputes=False)
    assert torch.equal(doubled.moe_layers()[0].expert_load, 2 * plain.moe_layers()[0].expert_load)


def test_a_non_finite_step_changes_nothing():
    model = tiny_model()
    opts = optimizers_for(model, "adam")
    with torch.no_grad():
        model.blocks[0].attn_norm.weight[0] = float("nan")  # every logit becomes NaN
    before = copy.deepcopy(model.state_dict())
    result = train_step(model, opts, batch())
    assert result.skipped and result.balance == {}
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]) or (value.isnan() == before[name].isnan()).all(), name
    assert all(p.grad is None for p in model.parameters())
    assert all(float(m.expert_load.sum()) == 0 for m in model.moe_layers())
    assert all(not opt.state for opt in opts)  # no optimizer ever stepped


@pytest.mark.parametrize("table_optimizer, expected", [("adam", Float32StateAdam), ("sparse_adam", SparseRowAdam),
                                                       ("row_adam", SparseRowAdam)])
def test_bf16_tables_train_with_float32_state(table_optimizer, expected):
    model = tiny_model(sparse_grads=table_optimizer != "adam")
    engine.cast_tables(model, "bf16")
    tables = [p for n, p in model.named_parameters() if ".engram.table." in n]
    assert tables and all(p.dtype == torch.bfloat16 for p in tables)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".engram.table." not in n)
    opts = optimizers_for(model, table_optimizer)
    assert type(opts[1]) is expected
    before = tables[0].detach().clone()
    for seed in range(2):
        result = train_step(model, opts, batch(seed=seed), dtype="bf16")
        assert not result.skipped
    assert tables[0].dtype == torch.bfloat16 and not torch.equal(before, tables[0])
    for state in opts[1].state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def test_bf16_autocast_step_stays_close_to_fp32():
    """One step's loss in bf16 autocast is within 0.02 nats of fp32 (bf16 keeps 8 bits of
    mantissa, ~0.4% per rounding; the loss, ~ln 300 = 5.7 nats, is a float32 reduction)."""
    a, b = tiny_model(), tiny_model()
    ids = batch()
    la = train_step(a, optimizers_for(a, "adam"), ids).loss
    lb = train_step(b, optimizers_for(b, "adam"), ids, dtype="bf16").loss
    assert abs(la - lb) < 0.02, (la, lb)
    assert all(p.dtype == torch.float32 for p in b.parameters())  # master weights stay float32


def test_training_memory_estimate_and_warning():
    config = preset_config("tiny", vocab_size=V)
    from engram.model.accounting import count_params

    counts = count_params(config)
    tables = counts["engram_tables_params"]
    assert engine.training_bytes(config) == 16 * counts["numel"]
    assert engine.training_bytes(config, "bf16") == 16 * counts["numel"] - 4 * tables
    assert engine.fit_warning(config, torch.device("cpu")) is None
    big = preset_config("engram_27b", vocab_size=129280)
    message = engine.fit_warning(big, torch.device("cpu"))
    assert message is None or "expect to run out of memory" in message


def test_bf16_on_a_cpu_without_native_bf16_warns_once(monkeypatch):
    """--dtype bf16 where the CPU emulates it (this project's machine: about 30x slower than
    fp32) is said once per process, and not at all for fp32 or where bf16 is native."""
    import warnings

    monkeypatch.setattr(device_, "_warned_bf16_cpu", False)
    monkeypatch.setattr(device_, "bf16_cpu_is_slow", lambda: True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        device_.warn_if_slow(torch.device("cpu"), "fp32")
        device_.warn_if_slow(torch.device("cpu"), "bf16")
        device_.warn_if_slow(torch.device("cpu"), "bf16")
    assert len(seen) == 1 and "about 30x slower than fp32" in str(seen[0].message)
    monkeypatch.setattr(device_, "_warned_bf16_cpu", False)
    monkeypatch.setattr(device_, "bf16_cpu_is_slow", lambda: False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        device_.warn_if_slow(torch.device("cpu"), "bf16")
    assert not seen
