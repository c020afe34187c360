"""The Engram module: gate formula, zero-init conv, causality, streams, errors, gradients."""

import math

import numpy as np
import pytest
import torch

from engram import Engram, EngramConfig, InMemoryTable, NgramHasher, ShortConvState


def make(M=1, D=16, conv_zero_init=True, **kw):
    cfg = EngramConfig(compressed_vocab_size=97, pad_id=0, layer_ids=(1,), rows_per_head=(53, 61),
                       max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8,
                       conv_zero_init=conv_zero_init, **kw)
    hasher = NgramHasher.from_config(cfg)
    module = Engram(cfg, hasher.table_sizes[1], hidden_size=D, n_streams=M, layer_id=1)
    return cfg, hasher, module


def shape(module):
    """The width and streams another module needs to match `module`."""
    return dict(hidden_size=module.hidden_size, n_streams=module.n_streams)


def inputs(hasher, module, B=2, T=13):
    ids = torch.randint(0, module.config.compressed_vocab_size, (B, T))
    hidden = torch.randn(B, T, module.n_streams, module.hidden_size)
    return ids, hidden, hasher.hash(ids)[1]


def randomize(module):
    """Random weights everywhere (norm gains around 1); a zero-init conv stays zero."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "short_conv.weight" and module.config.conv_zero_init:
                continue
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))


@pytest.mark.parametrize("M", [1, 4])
def test_gate_and_output_against_a_direct_computation(M):
    cfg, hasher, module = make(M=M, conv_zero_init=True, bias=True)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module)
    out, gates = module(hidden, rows, return_gates=True)
    D = module.hidden_size
    # direct: table rows -> e; W_V, W_K^m; RMSNorm written out; signed-sqrt sigmoid
    W, b = module.proj.weight.detach(), module.proj.bias.detach()
    flat = rows + module.table.offsets
    e = module.table.weight.detach()[flat].reshape(*rows.shape[:2], -1)
    v = e @ W[:D].T + b[:D]

    def rms(x, w, eps):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    for m in range(M):
        k = e @ W[D * (1 + m):D * (2 + m)].T + b[D * (1 + m):D * (2 + m)]
        s = (rms(k, module.key_norm.weight[m], 1e-6) * rms(hidden[:, :, m], module.query_norm.weight[m], 1e-6)).sum(-1)
        s = s / math.sqrt(D)
        alpha = 1 / (1 + torch.exp(-torch.where(s >= 0, 1.0, -1.0) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))))
        err = (gates[:, :, m] - alpha).abs().max().item()
        assert err < 1e-5, f"gate differs by {err}"
        err = (out[:, :, m] - alpha.unsqueeze(-1) * v).abs().max().item()
        assert err < 1e-4, f"output differs by {err}"


def test_zero_init_conv_gives_exactly_the_gated_value():
    cfg, hasher, module = make(M=4)
    ids, hidden, rows = inputs(hasher, module)
    assert torch.count_nonzero(module.short_conv.weight) == 0
    out, gates = module(hidden, rows, return_gates=True)
    no_conv = Engram(EngramConfig(**{**cfg.to_dict(), "use_short_conv": False}), hasher.table_sizes[1],
                     **shape(module))
    no_conv.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("short_conv")})
    assert torch.equal(out, no_conv(hidden, rows))
    v = module.proj(module.table(rows).flatten(2))[..., :module.hidden_size]
    assert torch.equal(out, gates.unsqueeze(-1) * v.unsqueeze(2))


@pytest.mark.parametrize("M", [1, 4])
def test_causality(M):
    cfg, hasher, module = make(M=M, conv_zero_init=False)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module, T=20)
    out = module(hidden, rows)
    t0 = 9
    ids2 = ids.clone()
    ids2[:, t0 + 1:] = torch.randint(0, cfg.compressed_vocab_size, ids2[:, t0 + 1:].shape)
    hidden2 = hidden.clone()
    hidden2[:, t0 + 1:] += torch.randn_like(hidden2[:, t0 + 1:])
    out2 = module(hidden2, hasher.hash(ids2)[1])
    assert torch.equal(out[:, :t0 + 1], out2[:, :t0 + 1])
    assert not torch.allclose(out[:, t0 + 1:], out2[:, t0 + 1:])
    # and the conv really reaches back: the trigram at t0 + 3 no longer contains id t0, so a new
    # id at t0 reaches output t0 + 3 only through the conv (dilation N = 3). (A change of the
    # hidden state alone would not do: for M = 1 it only rescales v~, which the conv's RMSNorm undoes.)
    ids3 = ids.clone()
    ids3[:, t0] = (ids3[:, t0] + 1) % cfg.compressed_vocab_size
    out3 = module(hidden, hasher.hash(ids3)[1])
    assert not torch.allclose(out[:, t0 + 3], out3[:, t0 + 3])


def test_flat_hidden_for_one_stream_equals_four_dim():
    cfg, hasher, module = make(M=1, conv_zero_init=False)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module)
    out3d = module(hidden[:, :, 0], rows)
    assert out3d.shape == hidden[:, :, 0].shape
    assert torch.equal(out3d, module(hidden, rows)[:, :, 0])


def test_streams_share_value_but_gate_separately():
    cfg, hasher, module = make(M=4)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module)
    out, gates = module(hidden, rows, return_gates=True)
    assert gates.shape == (2, 13, 4) and out.shape == hidden.shape
    ratio = out / gates.unsqueeze(-1)  # = v for every stream (zero-init conv)
    assert torch.allclose(ratio[:, :, 0], ratio[:, :, 3], atol=1e-5)
    assert not torch.allclose(gates[:, :, 0], gates[:, :, 3])


def test_chunked_conv_state_equals_full_forward():
    cfg, hasher, module = make(M=4, conv_zero_init=False)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module, T=17)
    full = module(hidden, rows)
    state, outs, t = ShortConvState(), [], 0
    for s in [1, 4, 2, 1, 6, 3]:
        outs.append(module(hidden[:, t:t + s], rows[:, t:t + s], conv_state=state))
        t += s
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("M, bias, eps", [(1, False, 1e-6), (4, True, None)])
def test_decode_step_equals_full_forward(M, bias, eps, monkeypatch):
    """Under no_grad a one-token step with conv history takes the lean `_step` path: same
    outputs as the full forward, and the same conv history as the general path leaves."""
    cfg, hasher, module = make(M=M, conv_zero_init=False, bias=bias, gate_norm_eps=eps)
    randomize(module)
    ids, hidden, rows = inputs(hasher, module, T=11)
    steps = []
    monkeypatch.setattr(module, "_step", lambda *a, f=module._step: steps.append(1) or f(*a))
    with torch.no_grad():
        full = module(hidden, rows)
        lean, general = ShortConvState(), ShortConvState()
        outs = [module(hidden[:, :3], rows[:, :3], conv_state=lean)]
        module(hidden[:, :3], rows[:, :3], conv_state=general)
        for t in range(3, 11):
            outs.append(module(hidden[:, t:t + 1], rows[:, t:t + 1], conv_state=lean))
            module(hidden[:, t:t + 1], rows[:, t:t + 1], conv_state=general, return_gates=True)  # general path
    assert len(steps) == 8
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err < 1e-5, err
    assert torch.allclose(lean.history, general.history, atol=1e-6)


def test_no_gate_ablation_passes_value_to_all_streams():
    cfg, hasher, module = make(M=2, use_gate=False)
    ids, hidden, rows = inputs(hasher, module)
    out, gates = module(hidden, rows, return_gates=True)
    assert torch.equal(gates, torch.ones_like(gates))
    assert torch.equal(out[:, :, 0], out[:, :, 1])


def test_shape_and_range_errors():
    cfg, hasher, module = make(M=4)
    ids, hidden, rows = inputs(hasher, module)
    with pytest.raises(ValueError, match=r"\[B, T, M=4, D=16\]"):
        module(hidden[:, :, 0], rows)
    with pytest.raises(ValueError, match="must match hidden"):
        module(hidden, rows[:, :5])
    with pytest.raises(ValueError, match=r"\[\.\.\., H=4\]"):
        module(hidden, rows[..., :3])
    bad = rows.clone()
    bad[0, 3, 2] = hasher.table_sizes[1][2]  # one past the end of head 2's table
    with pytest.raises(ValueError, match="out of range for hash table 2"):
        module(hidden, bad)
    with pytest.raises(ValueError, match="table sizes"):
        Engram(cfg, hasher.table_sizes[1][:3], **shape(module))


def test_gradients_reach_exactly_the_rows_read_dense_and_sparse():
    grads = []
    for sparse in (False, True):
        torch.manual_seed(0)
        cfg, hasher, module = make(M=2)  # zero rows: the gradient of a loss linear in the output
        module.table.sparse = sparse  # the table optimizer's choice (EngramLM.use_sparse_table_grads)
        ids = torch.randint(0, 97, (2, 9))
        rows = hasher.hash(ids)[1]
        (module(torch.randn(2, 9, 2, 16), rows) * torch.randn(2, 9, 2, 16)).sum().backward()
        g = module.table.weight.grad
        assert g.is_sparse == sparse
        grads.append(g.to_dense())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    touched = grads[0].abs().sum(1).nonzero().flatten()
    read = torch.unique(rows + module.table.offsets)
    assert torch.equal(touched, read)


def test_builds_on_meta_device_then_materializes():
    cfg, hasher, built = make(M=4)
    module = Engram(cfg, hasher.table_sizes[1], **shape(built), device="meta")
    assert module.table.weight.is_meta
    module.to_empty(device="cpu")
    module.reset_parameters()
    assert module.table.offsets.tolist() == np.cumsum([0] + hasher.table_sizes[1][:-1]).tolist()
    assert torch.count_nonzero(module.short_conv.weight) == 0
    ids, hidden, rows = inputs(hasher, module)
    assert torch.isfinite(module(hidden, rows)).all()


# ---------------------------------------------------------------- low precision and init scale
def gate_by_hand(h, k, w_q, w_k, eps=1e-6):
    """The gate in float64, written out (RMSNorm, dot, signed square root, sigmoid)."""
    h, k = h.double(), k.double()
    D = h.shape[-1]
    s = ((h * torch.rsqrt((h * h).mean(-1, keepdim=True) + eps) * w_q.double())
         * (k * torch.rsqrt((k * k).mean(-1, keepdim=True) + eps) * w_k.double())).sum(-1) / math.sqrt(D)
    return torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())


def gate_in_dtype(module, h, k):
    """The gate as computed before issue 10: in the inputs' own dtype, no upcast."""
    D, eps = module.hidden_size, module.config.gate_norm_eps

    def r(x):
        return torch.rsqrt(torch.linalg.vector_norm(x, dim=-1).square() / D + eps)

    s = (h * k * (module.query_norm.weight * module.key_norm.weight)).sum(-1) * r(h) * r(k) / math.sqrt(D)
    return torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt())


@pytest.mark.parametrize("dtype, half_ulp", [(torch.bfloat16, 2 ** -9), (torch.float16, 2 ** -12)])
def test_gate_of_a_large_hidden_state_in_low_precision_matches_fp32(dtype, half_ulp, rng):
    """|h| = 1e4 per stream. (1) On the same rounded h and k, the module's gate equals the float64
    formula up to rounding the gate itself to `dtype` (half an ulp below 1.0), while computing in
    `dtype` saturates in fp16 (mean(h^2) overflows: every gate 0.5) and in bf16 errs well beyond
    that rounding. (2) Against the fp32 module on unrounded inputs the gap is what rounding h and
    k to `dtype` costs; the signed square root magnifies it near s = 0, so the max over 8192 gates
    reaches ~0.04 in bf16 (8 bits) while the mean stays near 1e-3."""
    cfg, hasher, module = make(M=4, D=64, table_init_std=1.0)  # keys from N(0, 1) rows
    D, M = 64, 4
    ids = torch.randint(0, cfg.compressed_vocab_size, (16, 128))
    rows = hasher.hash(ids)[1]
    hidden = torch.randn(16, 128, M, D)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 1e4
    low = Engram(cfg, hasher.table_sizes[1], **shape(module), layer_id=1).to(dtype)
    low.load_state_dict(module.state_dict())
    h = hidden.to(dtype)
    with torch.no_grad():
        _, gates = low(h, rows, return_gates=True)
        k = low.proj(low.table(rows).flatten(2).to(dtype))[..., D:].unflatten(-1, (M, D))
        exact = gate_by_hand(h, k, low.query_norm.weight, low.key_norm.weight)
        naive = gate_in_dtype(low, h, k)
        _, gates32 = module(hidden, rows, return_gates=True)
    assert gates.dtype == dtype
    err = (gates.double() - exact).abs().max().item()
    assert err <= half_ulp + 1e-6, f"{dtype} gate differs from the float64 formula by {err} (> rounding {half_ulp})"
    err_naive = (naive.double() - exact).abs().max().item()
    assert err_naive > (0.1 if dtype == torch.float16 else 2 * half_ulp), f"computing in {dtype} erred only {err_naive}"
    gap = (gates.float() - gates32).abs()
    max_tol, mean_tol = (6e-2, 3e-3) if dtype == torch.bfloat16 else (2e-2, 5e-4)
    assert gap.max() < max_tol and gap.mean() < mean_tol, \
        f"{dtype} vs fp32 module: max {gap.max().item():.4f}, mean {gap.mean().item():.5f}"


def test_standalone_module_starts_at_the_residual_scale(rng):
    """v = W e with table rows e ~ N(0, 1) and W ~ N(0, 0.02^2 / d_mem): rms(v) = 0.02. With the
    zero-init conv the output is a * v, a = sigmoid(sign(s) sqrt|s|) and s = sqrt(D) cos(h, k)
    ~ N(0, 1) for unrelated h and k; so rms(out) = 0.02 sqrt(E[a^2]), E over s ~ N(0, 1).
    nn.Linear's default init (uniform +-1/sqrt(d_mem)) would give rms(v) = 1/sqrt(3)."""
    cfg, hasher, module = make(M=4, D=64, table_init_std=1.0)
    ids, hidden, rows = inputs(hasher, module, B=8, T=128)
    with torch.no_grad():
        out = module(hidden, rows)
        v = module.proj(module.table(rows).flatten(2))[..., :64]
    s = torch.linspace(-10, 10, 200_001, dtype=torch.float64)
    pdf = torch.exp(-s * s / 2) / math.sqrt(2 * math.pi)
    a2 = torch.sigmoid(s.sign() * s.abs().sqrt()) ** 2
    expected = 0.02 * math.sqrt(torch.trapezoid(a2 * pdf, s).item())
    rms_v, rms_out = v.pow(2).mean().sqrt().item(), out.pow(2).mean().sqrt().item()
    assert abs(rms_v / 0.02 - 1) < 0.15, f"value rms {rms_v:.4f}, expected 0.02"
    assert abs(rms_out / expected - 1) < 0.15, f"output rms {rms_out:.4f}, expected {expected:.4f}"
    module.reset_parameters()
    assert module.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(cfg.memory_dim), rel=0.15)
    assert Engram(cfg, hasher.table_sizes[1], **shape(module), init_std=0.1).proj.weight.std().item() == pytest.approx(
        0.1 / math.sqrt(cfg.memory_dim), rel=0.15)


@pytest.mark.parametrize("use_gate", [True, False])
def test_table_init_std_scales_the_rows_and_zero_rows_add_nothing(rng, use_gate):
    cfg, hasher, module = make(M=2, table_init_std=0.25, use_gate=use_gate)
    assert module.table.weight.std().item() == pytest.approx(0.25, rel=0.1)
    module.reset_parameters()
    assert module.table.weight.std().item() == pytest.approx(0.25, rel=0.1)
    # zero rows: value and keys are zero whatever the projection, so the module adds exactly nothing
    cfg, hasher, module = make(M=2, conv_zero_init=False, table_init_std=0.0, use_gate=use_gate)
    assert not module.table.weight.any()
    ids, hidden, rows = inputs(hasher, module)
    assert not module(hidden, rows).any()
    table = InMemoryTable(hasher.table_sizes[1], cfg.row_dim)
    given = table.weight.detach().clone()
    Engram(cfg, hasher.table_sizes[1], **shape(module), table=table)
    assert torch.equal(table.weight, given)  # a table passed in keeps its rows


def test_passing_every_layers_rows_says_which_to_pass():
    cfg, hasher, module = make()
    ids, hidden, rows = inputs(hasher, module)
    with pytest.raises(ValueError, match=r"pass this layer's: rows\[1\]"):
        module(hidden, hasher.hash(ids))
