"""Hyper-connections (mHC): Sinkhorn, M = 1 residual, formulas, map ranges, depth, chunking, grads."""

import math

import pytest
import torch
import torch.nn.functional as F

from engram.model.hyper import HyperConnection, expand_streams, merge_streams, sinkhorn

B, T, D = 2, 7, 16


def randomize(hc, scale=0.5):
    """Random weights everywhere, the maps' logits ~N(0, (1.1 scale)^2): phi ~ N(0, 1/K) makes
    x' phi ~ N(0, 1) for unit-RMS x'; alphas in scale * [0.5, 1.5]; biases N(0, (scale/2)^2).
    At scale 0.5 H_res is far from I (entries ~1/M) and 20 Sinkhorn steps converge to 1e-6."""
    with torch.no_grad():
        hc.phi.normal_(0.0, 1.0 / math.sqrt(hc.phi.shape[1]))
        for a in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
            a.fill_(scale * (0.5 + torch.rand(()).item()))
        for b in (hc.bias_pre, hc.bias_post, hc.bias_res):
            b.normal_(0.0, scale / 2)
    return hc


def sinkhorn_reference(logits, iters):
    """mHC eq. 9 in the exp domain, float64: M0 = exp(logits), then columns, rows, ... ."""
    p = logits.double().exp()
    for _ in range(iters):
        p = p / p.sum(-2, keepdim=True)
        p = p / p.sum(-1, keepdim=True)
    return p


def test_sinkhorn_is_doubly_stochastic(rng):
    logits = 0.5 * torch.randn(3, 5, 4, 4)  # batched; N(0, 1) logits need more than 20 steps at times
    p = sinkhorn(logits, 20)
    rows, cols = (p.sum(-1) - 1).abs().max().item(), (p.sum(-2) - 1).abs().max().item()
    assert rows < 1e-4 and cols < 1e-4, f"max |row sum - 1| = {rows:.2e}, max |col sum - 1| = {cols:.2e}"
    assert (p >= 0).all(), f"min entry {p.min().item():.2e}"
    diff = (p.double() - sinkhorn_reference(logits, 20)).abs().max().item()
    assert diff < 1e-6, f"log-domain Sinkhorn differs from the exp-domain reference by {diff:.2e}"
    wide = sinkhorn(8.0 * torch.randn(64, 4, 4), 20)  # rows are exact after any number of steps
    assert (wide.sum(-1) - 1).abs().max() < 1e-5 and torch.isfinite(wide).all()
    assert sinkhorn(logits.bfloat16(), 20).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.randn(2, 3, 4), 20)


def test_one_stream_is_the_ordinary_residual(rng):
    hc = HyperConnection(D, 1)
    assert sum(p.numel() for p in hc.parameters()) == 0
    x, w = torch.randn(B, T, 1, D), torch.randn(D, D)
    fn = lambda h: torch.tanh(h @ w)  # noqa: E731
    assert torch.equal(hc(x, fn), x + fn(x[:, :, 0]).unsqueeze(2))
    h = torch.randn(B, T, D)
    assert torch.equal(merge_streams(expand_streams(h, 1)), h)
    assert torch.equal(merge_streams(x), x[:, :, 0])


def test_four_streams_against_a_direct_computation(rng):
    M = 4
    hc = randomize(HyperConnection(D, M, sinkhorn_iters=20, norm_eps=1e-6, layer_index=3), scale=1.0)
    x, w = torch.randn(B, T, M, D), torch.randn(D, D) / math.sqrt(D)
    fn = lambda h: torch.tanh(h @ w)  # noqa: E731

    flat = x.reshape(B, T, M * D)
    xn = flat / torch.sqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)  # RMSNorm(vec(x)), no gain
    z = xn @ hc.phi.T
    h_pre = torch.sigmoid(hc.alpha_pre * z[..., :M] + hc.bias_pre)
    h_post = 2 * torch.sigmoid(hc.alpha_post * z[..., M:2 * M] + hc.bias_post)
    h_res = sinkhorn_reference(hc.alpha_res * z[..., 2 * M:].reshape(B, T, M, M) + hc.bias_res, 20).float()
    layer_in = (h_pre[..., None] * x).sum(2)  # H_pre x_l
    expected = torch.einsum("btij,btjd->btid", h_res, x) + h_post[..., None] * fn(layer_in)[:, :, None, :]

    got = hc(x, fn)
    diff = (got - expected).abs().max().item()
    assert diff < 1e-5, f"HyperConnection vs direct formulas: max |diff| = {diff:.2e}"


def test_maps_are_on_their_manifolds_and_start_near_the_residual(rng):
    M = 4
    hc = HyperConnection(D, M, layer_index=6)
    h_pre, h_post, h_res = hc.maps(torch.randn(B, T, M, D))
    assert torch.equal(h_post, torch.ones_like(h_post)), "H_post should start at 2 sigmoid(0) = 1"
    own, other = torch.sigmoid(torch.tensor([2.0, -2.0])).tolist()  # 0.881, 0.119
    expected = torch.full((M,), other)
    expected[6 % M] = own  # sublayer 6 reads stream 6 % 4 = 2
    diff = (h_pre - expected).abs().max().item()
    assert diff < 1e-6, f"H_pre should start at {expected.tolist()}, max |diff| = {diff:.2e}"
    eye_err = (h_res - torch.eye(M)).abs().max().item()
    assert eye_err < 2e-3, f"H_res should start near the identity, max |H_res - I| = {eye_err:.2e}"

    h_pre, h_post, h_res = randomize(hc, scale=8.0).maps(torch.randn(B, T, M, D))  # saturating
    assert h_pre.shape == h_post.shape == (B, T, M) and h_res.shape == (B, T, M, M)
    assert h_pre.min() >= 0 and h_pre.max() <= 1, f"H_pre in [{h_pre.min():.3f}, {h_pre.max():.3f}]"
    assert h_post.min() >= 0 and h_post.max() <= 2, f"H_post in [{h_post.min():.3f}, {h_post.max():.3f}]"
    assert h_res.min() >= 0 and (h_res.sum(-1) - 1).abs().max() < 1e-5, "H_res rows must sum to 1"
    _, _, h_res = randomize(hc, scale=0.5).maps(torch.randn(B, T, M, D))  # 20 steps converge here
    rows, cols = (h_res.sum(-1) - 1).abs().max().item(), (h_res.sum(-2) - 1).abs().max().item()
    assert h_res.min() >= 0 and rows < 1e-4 and cols < 1e-4, f"H_res row err {rows:.2e}, col err {cols:.2e}"


def test_deep_stack_keeps_stream_norms_bounded(rng):
    """64 strongly mixing layers (H_res far from I, input-dependent):
    - the doubly stochastic residual path alone never amplifies a stream norm (each H_res has
      spectral norm <= 1);
    - with pre-norm sublayers F(h) = Q RMSNorm(h), Q random orthogonal of spectral norm
      1/sqrt(L) (depth-scaled like the model's output projections), the norm stays within 10x.
    Sublayers of spectral norm 1 without a pre-norm would grow any residual stack, M = 1
    included, by ~sqrt(2) per layer, so they cannot show anything about H_res."""
    M, L = 4, 64
    layers = [randomize(HyperConnection(D, M, layer_index=i)) for i in range(L)]
    qs = [torch.linalg.qr(torch.randn(D, D))[0] / math.sqrt(L) for _ in range(L)]
    # Rows 0..B-1 run the residual path alone (F = 0), rows B.. the full layers: the maps are
    # per position, so one batch runs both.
    keep = torch.cat([torch.zeros(B), torch.ones(B)]).view(2 * B, 1, 1)
    x0 = torch.randn(2 * B, T, M, D)
    norm = lambda x: x.norm(dim=(-2, -1))  # noqa: E731  per position, over all streams: [2B, T]
    x = x0
    with torch.no_grad():
        for hc, q in zip(layers, qs):
            y = hc(x, lambda h: keep * (F.rms_norm(h, (D,)) @ q.T))
            growth = (norm(y[:B]) / norm(x[:B])).max().item()
            assert growth <= 1 + 1e-4, f"the residual path grew a stream norm by {growth:.6f}x in one layer"
            x = y
    ratio = norm(x[B:]) / norm(x0[B:])  # over 300 seeds: 0.19x .. 2.2x
    assert ratio.max() < 10 and ratio.min() > 0.1, (
        f"after {L} layers the stream norm changed by {ratio.min():.3f}x .. {ratio.max():.3f}x")


def test_chunked_processing_equals_the_full_run(rng):
    M = 4
    hc = randomize(HyperConnection(D, M, layer_index=1))
    lin = torch.nn.Linear(D, D)
    x = torch.randn(B, 12, M, D)
    with torch.no_grad():
        full = hc(x, lin)
        chunks = torch.cat([hc(x[:, a:b], lin) for a, b in ((0, 5), (5, 9), (9, 10), (10, 12))], dim=1)
    diff = (full - chunks).abs().max().item()
    assert diff < 1e-5, f"chunked vs full run: max |diff| = {diff:.2e}"


def test_gradients_reach_alphas_and_the_fused_weight(rng):
    M = 4
    hc = HyperConnection(D, M)
    x, lin = torch.randn(B, T, M, D), torch.nn.Linear(D, D)
    hc(x, lin).pow(2).sum().backward()
    assert hc.phi.grad.abs().max() > 0, "phi gets no gradient at init"  # alphas do not: phi = 0
    hc.zero_grad()
    randomize(hc)
    hc(x, lin).pow(2).sum().backward()
    for name, p in hc.named_parameters():
        g = p.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f"{name}: grad {g}"


def test_expand_merge_and_shape_errors(rng):
    h = torch.randn(B, T, D)
    x = expand_streams(h, 4)
    assert x.shape == (B, T, 4, D) and torch.equal(x[:, :, 3], h)
    diff = (merge_streams(x) - h).abs().max().item()
    assert diff < 1e-6, f"merge(expand(h)) should be h, max |diff| = {diff:.2e}"
    with pytest.raises(ValueError, match=r"\[B, T, M=4, D=16\]"):
        HyperConnection(D, 4)(h, lambda t: t)
    with pytest.raises(ValueError, match="n_streams"):
        expand_streams(h, 0)


def test_sinkhorn_equals_the_all_log_domain_version_with_fewer_ops():
    """One log-domain step, then plain sums: the same matrices as every step in the log domain
    (the original, kept as oracle) within 1e-6, at least as close to a float64 reference, and
    finite where exp() of the raw logits underflows a whole column."""
    from engram.model.hyper import sinkhorn_log_domain

    off_diag = torch.where(torch.eye(4, dtype=torch.bool), 0.0, -8.0)  # the init's b_res
    for scale in (0.01, 0.5, 2.0, 5.0):
        logits = scale * torch.randn(512, 4, 4) + off_diag
        new, old = sinkhorn(logits, 20), sinkhorn_log_domain(logits, 20)
        diff = (new - old).abs().max().item()
        assert diff < 1e-6, f"scale {scale}: max |new - log-domain| = {diff:.2e}"
        ref = sinkhorn_reference(logits, 20)
        assert (new.double() - ref).abs().max() <= (old.double() - ref).abs().max() + 1e-7
    cold = torch.randn(64, 4, 4)
    cold[..., 0] -= 200.0  # exp(-200) = 0 in float32: column 0 underflows before normalizing
    new, old = sinkhorn(cold, 20), sinkhorn_log_domain(cold, 20)
    assert torch.isfinite(new).all() and (new - old).abs().max() < 1e-6
    # rows are normalized last, so they sum to 1; 20 steps leave the columns as far from 1 as the
    # oracle's (up to ~1e-3 for some draws: column 0 starts 200 nats down), no farther
    assert (new.sum(-1) - 1).abs().max() < 1e-5
    assert (new.sum(-2) - 1).abs().max() <= (old.sum(-2) - 1).abs().max() + 1e-6

    counts = []  # aten ops run per call, nested ones included (logsumexp is ~7 of them)
    for fn in (sinkhorn, sinkhorn_log_domain):
        with torch.profiler.profile() as prof:
            fn(torch.randn(1, 1, 4, 4), 20)
        counts.append(sum(e.name.startswith("aten::") for e in prof.events()))
    assert counts[0] * 3 < counts[1], f"aten ops per call: {counts[0]} vs the log-domain version's {counts[1]}"
