"""SwiGLU MLP and DeepSeekMoE: a naive per-token reference, routing weights, loss-free
balancing, gradient flow, per-token independence, errors, load counting."""

import pytest
import torch
import torch.nn.functional as F

from engram.config import MoEConfig
from engram.model.moe import MLP, MoE

D, E, K, FF = 16, 8, 2, 12


def make(n_shared=1, route_scale=2.5, bias_update_rate=1e-3, **kw):
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=n_shared, top_k=K, expert_hidden_size=FF,
                    route_scale=route_scale, bias_update_rate=bias_update_rate, **kw)
    return MoE(D, cfg)


def swiglu(x, w_gate, w_up, w_down):
    return w_down @ (F.silu(w_gate @ x) * (w_up @ x))


def reference(moe, x):
    """One token at a time, straight from the definition."""
    c = moe.config
    ex = moe.experts
    out = torch.zeros_like(x)
    for i, x_D in enumerate(x.reshape(-1, D)):
        s = torch.sigmoid(moe.router.weight @ x_D)
        idx = torch.topk(s + moe.router_bias, c.top_k).indices
        w = s[idx] / s[idx].sum() * c.route_scale
        y = torch.zeros(D)
        if moe.shared is not None:
            sh = moe.shared
            y = y + swiglu(x_D, sh.w_gate.weight, sh.w_up.weight, sh.w_down.weight)
        for wk, e in zip(w, idx.tolist()):
            y = y + wk * swiglu(x_D, ex.w_gate[e], ex.w_up[e], ex.w_down[e])
        out.view(-1, D)[i] = y
    return out


def test_moe_matches_naive_reference_with_nonzero_bias(rng):
    moe = make()
    with torch.no_grad():
        moe.router_bias.copy_(torch.randn(E) * 0.05)  # scores sit near 0.5 +- 0.03: bias matters
    x = torch.randn(3, 5, D)
    with torch.no_grad():
        y, routing = moe(x, return_routing=True)
        plain = torch.topk(torch.sigmoid(x @ moe.router.weight.T), K).indices
        ref = reference(moe, x)
    changed = (plain.sort(-1).values != routing["experts"].sort(-1).values).any(-1).sum().item()
    assert changed > 0, "the bias never changed the selection; the test would not cover it"
    err = (y - ref).abs().max().item()
    assert err < 1e-5, f"MoE differs from the naive reference by {err}"


def test_weights_sum_to_route_scale_and_experts_are_distinct(rng):
    moe = make(route_scale=2.5)
    _, routing = moe(torch.randn(4, 7, D), return_routing=True)
    assert routing["experts"].shape == (4, 7, K) and routing["experts"].dtype == torch.long
    assert routing["weights"].shape == (4, 7, K)
    err = (routing["weights"].sum(-1) - 2.5).abs().max().item()
    assert err < 1e-5, f"weights sum to route_scale=2.5 only within {err}"
    assert (routing["weights"] > 0).all()
    srt = routing["experts"].sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all(), "a token picked the same expert twice"


def test_bias_updates_balance_a_skewed_router(rng):
    moe = make(bias_update_rate=0.03).train()
    u = F.normalize(torch.randn(D), dim=0)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 0.3)  # wide enough that tokens disagree about the other experts
        moe.router.weight[:2] += 3.0 * u  # experts 0 and 1 win for most inputs along u
    params = {n: p.detach().clone() for n, p in moe.named_parameters()}
    x = 2.0 * u + torch.randn(256, D)
    violations = []
    with torch.no_grad():
        for _ in range(50):
            moe(x)
            violations.append(moe.update_bias()["max_violation"])
    start, end = violations[0], sum(violations[-10:]) / 10
    assert start > 2.0, f"the router was meant to be skewed; initial max_violation is only {start:.3f}"
    assert end < 0.5 * start, f"max_violation went {start:.3f} -> {end:.3f} (mean of the last 10 updates)"
    assert moe.router_bias[:2].max() < moe.router_bias[2:].min(), "the overloaded experts' bias should fall"
    for n, p in moe.named_parameters():
        assert torch.equal(p, params[n]), f"balancing changed parameter {n}"
    assert moe.expert_load.sum().item() == 0, "update_bias must reset the load counts"
    assert moe.update_bias()["max_violation"] == 0.0


def test_gradients_reach_router_selected_experts_and_shared_only(rng):
    moe = make()
    x = torch.randn(1, 2, D)  # 2 tokens x K=2 picks: at least E - 4 experts are never chosen
    y, routing = moe(x, return_routing=True)
    (y * torch.randn_like(y)).sum().backward()
    chosen = set(routing["experts"].flatten().tolist())
    assert len(chosen) < E
    assert moe.router.weight.grad.abs().max() > 0, "no gradient reached the router"
    for name in ("w_gate", "w_up", "w_down"):
        g = getattr(moe.experts, name).grad
        for e in range(E):
            size = g[e].abs().max().item()
            if e in chosen:
                assert size > 0, f"selected expert {e} got no gradient in {name}"
            else:
                assert size == 0, f"expert {e} was never selected but {name} has gradient {size}"
    for name, p in moe.shared.named_parameters():
        assert p.grad.abs().max() > 0, f"no gradient reached shared.{name}"


def test_each_token_is_independent_of_the_others(rng):
    moe = make().eval()
    x = torch.randn(2, 9, D)
    with torch.no_grad():
        full = moe(x)
        one_by_one = torch.stack([torch.stack([moe(x[b, t]) for t in range(9)]) for b in range(2)])
        chunks = torch.cat([moe(x[:, :4]), moe(x[:, 4:])], dim=1)
    err = (full - one_by_one).abs().max().item()
    assert err < 1e-6, f"batched and token-by-token outputs differ by {err}"
    err = (full - chunks).abs().max().item()
    assert err < 1e-6, f"full and chunked outputs differ by {err}"


def test_mlp_is_swiglu(rng):
    mlp = MLP(D, FF)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    x = torch.randn(2, 3, D)
    ref = (F.silu(x @ mlp.w_gate.weight.T) * (x @ mlp.w_up.weight.T)) @ mlp.w_down.weight.T
    err = (mlp(x) - ref).abs().max().item()
    assert err < 1e-5, f"MLP differs from the SwiGLU formula by {err}"


def test_no_shared_experts_and_wrong_width(rng):
    moe = make(n_shared=0)
    assert moe.shared is None
    x = torch.randn(3, 4, D)
    with torch.no_grad():
        err = (moe(x) - reference(moe, x)).abs().max().item()
    assert err < 1e-5, f"routed-only MoE differs from the reference by {err}"
    with pytest.raises(ValueError, match=f"D={D}"):
        moe(torch.randn(2, 3, D + 1))


def test_load_counted_in_training_only_and_bias_is_persistent(rng):
    moe = make()
    x = torch.randn(2, 5, D)
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert moe.expert_load.sum().item() == 0, "eval-mode forward changed expert_load"
    moe.train()
    with torch.no_grad():
        _, routing = moe(x, return_routing=True)
    expected = torch.bincount(routing["experts"].flatten(), minlength=E).float()
    assert torch.equal(moe.expert_load, expected), f"load {moe.expert_load.tolist()} != {expected.tolist()}"
    keys = moe.state_dict().keys()
    assert "router_bias" in keys and "expert_load" not in keys


# ---------------------------------------------------------------- grouped experts vs the loop
def forward_and_grads(moe, x, loop):
    moe.zero_grad()
    x = x.detach().clone().requires_grad_()
    y, routing = moe(x, return_routing=True, loop=loop)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return y, x.grad, grads, routing


def test_grouped_experts_equal_the_loop_forward_and_backward(rng):
    """fp32: the grouped matmul does the same per-expert products; 1e-6 leaves room for a
    different BLAS blocking only. Few tokens, so some experts get none: exactly zero grads."""
    moe = make().train()
    x = torch.randn(1, 3, D)  # 3 tokens x K=2: at most 6 of the 8 experts are used
    y, gx, grads, routing = forward_and_grads(moe, x, loop=False)
    y_ref, gx_ref, grads_ref, _ = forward_and_grads(moe, x, loop=True)
    err = (y - y_ref).abs().max().item()
    assert err < 1e-6, f"grouped forward differs from the loop by {err}"
    err = (gx - gx_ref).abs().max().item()
    assert err < 1e-6, f"input gradients differ by {err}"
    for name, g in grads.items():
        err = (g - grads_ref[name]).abs().max().item()
        assert err < 1e-6, f"gradient of {name} differs from the loop by {err}"
    unused = sorted(set(range(E)) - set(routing["experts"].flatten().tolist()))
    assert unused, "every expert got tokens; the zero-token case is not covered"
    for name in ("w_gate", "w_up", "w_down"):
        g = grads[f"experts.{name}"][unused]
        assert torch.count_nonzero(g) == 0, f"experts {unused} got no tokens but {name} has gradient"


@pytest.mark.parametrize("ff", [16, 12])  # 16: torch._grouped_mm itself; 12: unaligned, via fp32
def test_grouped_experts_equal_the_loop_in_bf16(rng, ff):
    """bf16 weights: both paths multiply in bf16; outputs agree to bf16 rounding (2e-2 relative
    to the largest output: a few ulps of bf16's 2^-8)."""
    cfg = MoEConfig(n_routed_experts=E, top_k=K, expert_hidden_size=ff)
    moe = MoE(D, cfg).to(torch.bfloat16)
    x = torch.randn(4, 6, D, dtype=torch.bfloat16)
    with torch.no_grad():
        y, y_ref = moe(x), moe(x, loop=True)
    scale = y_ref.float().abs().max().item()
    err = (y.float() - y_ref.float()).abs().max().item()
    assert y.dtype == torch.bfloat16 and err < 2e-2 * scale, f"bf16 grouped vs loop: {err} (scale {scale})"


def test_grouped_experts_under_autocast(rng):
    """fp32 weights under bf16 autocast: the grouped path casts like autocast does for matmuls."""
    moe = make()
    x = torch.randn(4, 6, D)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = moe(x), moe(x, loop=True)
    scale = y_ref.float().abs().max().item()
    err = (y.float() - y_ref.float()).abs().max().item()
    assert err < 2e-2 * scale, f"autocast grouped vs loop: {err} (scale {scale})"


def test_moe_compiles_in_one_graph_forward_and_backward(rng):
    """No graph break (no host sync, no data-dependent shape) in the training forward, and
    AOTAutograd traces the backward too; the compiled step equals eager (1e-6)."""
    moe = make().train()
    x = torch.randn(2, 5, D)
    explanation = torch._dynamo.explain(moe)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(moe, fullgraph=True, backend="aot_eager")
    y, gx, grads, _ = forward_and_grads(compiled, x, loop=False)
    y_ref, gx_ref, grads_ref, _ = forward_and_grads(moe, x, loop=False)
    assert (y - y_ref).abs().max().item() < 1e-6
    for name, g in grads.items():
        err = (g - grads_ref[name.removeprefix("_orig_mod.")]).abs().max().item()
        assert err < 1e-6, f"compiled gradient of {name} differs by {err}"


# ---------------------------------------------------------------- fp32 balancing state
@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(),
                                  lambda m: m.to("cpu", torch.bfloat16)])
def test_balancing_buffers_stay_float32_after_a_cast(rng, cast):
    moe = make(bias_update_rate=1e-3)
    with torch.no_grad():
        moe.router_bias.fill_(1.0)
        moe.router_bias[0] = 1.0 + 2 ** -10  # survives because the buffer is never rounded
    cast(moe)
    assert moe.experts.w_gate.dtype != torch.float32, "the cast did not reach the parameters"
    assert moe.router_bias.dtype == moe.expert_load.dtype == torch.float32
    assert moe.router_bias[0].item() == 1.0 + 2 ** -10, "the cast rounded the bias before restoring float32"
    # 300 steps of +1e-3 from 1.0: 1.3 in float32; in bf16 (spacing 2^-7 at 1.0) each step rounds away
    with torch.no_grad():
        for _ in range(300):
            moe.expert_load.fill_(1.0)
            moe.expert_load[1] = 0.0  # expert 1 under-loaded: its bias rises
            moe.update_bias()
    assert abs(moe.router_bias[1].item() - 1.3) < 1e-4, f"bias reached {moe.router_bias[1].item()}, not 1.3"


def test_load_counts_stay_exact_past_256_in_bf16(rng):
    """257 tokens all routed to experts 0 and 1 (a huge bias picks them): the count is 257,
    which bf16 cannot hold (it rounds to 256)."""
    moe = make().to(torch.bfloat16).train()
    with torch.no_grad():
        moe.router_bias[:2] = 100.0
        moe(torch.randn(257, D, dtype=torch.bfloat16))
    assert moe.expert_load.tolist() == [257.0, 257.0] + [0.0] * (E - 2)
    assert torch.tensor(257.0, dtype=torch.bfloat16).item() != 257.0  # what a bf16 buffer would hold


def test_balancing_buffers_follow_device_moves(rng):
    moe = make().to("meta")
    assert moe.router_bias.device.type == "meta" and moe.experts.w_gate.device.type == "meta"
    moe = moe.to(torch.bfloat16).to_empty(device="cpu")
    assert moe.router_bias.device.type == "cpu" and moe.router_bias.dtype == torch.float32
