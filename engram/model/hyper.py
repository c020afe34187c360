"""Manifold-constrained hyper-connections (mHC, arXiv 2512.24880) around one sublayer F.

Shape legend: B batch, T time, M streams (n_streams), D width, K = M*D (streams flattened).

    x'     = RMSNorm(vec(x_l))                            x_l: [M, D], vec: [M*D]  (eq. 7)
    H_pre  = sigmoid(a_pre  * x' phi_pre  + b_pre)        [M]     reads F's input  (eq. 8)
    H_post = 2 sigmoid(a_post * x' phi_post + b_post)     [M]     writes F's output
    H_res  = SinkhornKnopp(a_res * mat(x' phi_res) + b_res) [M, M] doubly stochastic
    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)                                   (eq. 3)

Doubly stochastic H_res has spectral norm <= 1 and products of them stay doubly stochastic,
so the residual path neither explodes nor vanishes with depth. The maps read only the
current position's streams, so chunked (decode) processing equals the full forward.
M = 1 is the ordinary residual connection x + F(x), with no parameters.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import upcast

ALPHA_INIT = 0.01  # the gating factors a_*: mHC Table 5 ("Gating Factor Init 0.01")
PRE_LOGIT = 2.0  # b_pre: +2 on the layer's own stream, -2 elsewhere (see reset_parameters)
RES_OFF_DIAG_LOGIT = -8.0  # b_res: 0 on the diagonal, -8 off it: H_res ~ I (exp(-8) ~ 3e-4)


def sinkhorn(logits_XMM: torch.Tensor, iters: int) -> torch.Tensor:
    """Project exp(logits) onto the doubly stochastic matrices (Sinkhorn-Knopp, mHC eq. 9).

    Each of `iters` steps normalizes columns then rows, so rows sum to 1 exactly (every
    output stream is a convex mix of input streams) and columns to within the tolerance.
    Runs in float32; returns the input dtype.

    The first step runs in the log domain (logsumexp subtracts the max), so no row or column
    can underflow to an all-zero sum whatever the logits. After it every row sums to 1 and
    every column holds an entry >= 1/M^2 (its column-normalized max, >= 1/M, divided by a row
    sum <= M), and each later step keeps both, so the remaining steps divide by plain sums:
    the same iteration with 2 ops per half-step instead of logsumexp's ~7, which is what a
    decode step pays for at M > 1 (within 1e-6 of the all-log-domain version, and closer to
    a float64 reference; tests/unit/test_hyper.py).
    """
    if iters < 1:
        raise ValueError(f"sinkhorn needs iters >= 1, got {iters}")
    if logits_XMM.dim() < 2 or logits_XMM.shape[-1] != logits_XMM.shape[-2]:
        raise ValueError(f"sinkhorn needs square matrices [..., M, M], got {tuple(logits_XMM.shape)}")
    log_p = upcast(logits_XMM)
    log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns sum to 1
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows sum to 1
    p = log_p.exp()
    for _ in range(iters - 1):
        p = p / p.sum(dim=-2, keepdim=True)  # columns
        p = p / p.sum(dim=-1, keepdim=True)  # rows
    return p.to(logits_XMM.dtype)


def sinkhorn_log_domain(logits_XMM: torch.Tensor, iters: int) -> torch.Tensor:
    """Every step in the log domain: the original formulation, kept as the test oracle."""
    log_p = upcast(logits_XMM)
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_p.exp().to(logits_XMM.dtype)


def expand_streams(h_BTD: torch.Tensor, n_streams: int) -> torch.Tensor:
    """[B, T, D] -> [B, T, M, D]: every stream starts as a copy of the embedding (HC, mHC)."""
    if n_streams < 1:
        raise ValueError(f"n_streams must be >= 1 (1 = plain residual), got {n_streams}")
    if n_streams == 1:
        return h_BTD.unsqueeze(2)  # a view: nothing to copy
    return h_BTD.unsqueeze(2).repeat(1, 1, n_streams, 1)


def merge_streams(x_BTMD: torch.Tensor) -> torch.Tensor:
    """[B, T, M, D] -> [B, T, D]: the mean over streams.

    HC sums the streams; before the final RMSNorm sum and mean give the same output and the
    same gradients (RMSNorm is scale-invariant). The mean also keeps per-layer hidden states
    at the scale of an M = 1 model for analysis, and merge(expand(h)) = h. M = 1: x[:, :, 0].
    """
    if x_BTMD.shape[2] == 1:
        return x_BTMD[:, :, 0]  # the mean of one stream, as a view
    return x_BTMD.mean(dim=2)


class HyperConnection(nn.Module):
    """mHC around one sublayer: `forward(x [B,T,M,D], fn: [B,T,D] -> [B,T,D]) -> [B,T,M,D]`.

    `layer_index` counts sublayers (attention and MLP separately); H_pre starts reading
    stream `layer_index % M`, so different sublayers read different streams (HC's init).
    """

    def __init__(
        self, dim: int, n_streams: int, *, sinkhorn_iters: int = 20, norm_eps: float = 1e-6,
        layer_index: int = 0, device=None, dtype=None,
    ) -> None:
        super().__init__()
        if dim < 1 or n_streams < 1:
            raise ValueError(f"need dim >= 1 and n_streams >= 1, got dim={dim}, n_streams={n_streams}")
        if sinkhorn_iters < 1:
            raise ValueError(f"sinkhorn_iters must be >= 1 (mHC uses 20), got {sinkhorn_iters}")
        self.dim, self.n_streams, self.layer_index = dim, n_streams, layer_index
        self.sinkhorn_iters, self.norm_eps = sinkhorn_iters, norm_eps
        if n_streams == 1:
            return  # the plain residual: no parameters
        M, kw = n_streams, dict(device=device, dtype=dtype)
        # phi = [phi_pre | phi_post | phi_res] as one fused [M + M + M*M, M*D] matmul (mHC eq. 10).
        # A raw Parameter, not nn.Linear: a model-wide sweep calling every submodule's
        # reset_parameters() would otherwise overwrite its zero init with Kaiming.
        self.phi = nn.Parameter(torch.empty(2 * M + M * M, M * dim, **kw))
        self.alpha_pre = nn.Parameter(torch.empty((), **kw))
        self.alpha_post = nn.Parameter(torch.empty((), **kw))
        self.alpha_res = nn.Parameter(torch.empty((), **kw))
        self.bias_pre = nn.Parameter(torch.empty(M, **kw))
        self.bias_post = nn.Parameter(torch.empty(M, **kw))
        self.bias_res = nn.Parameter(torch.empty(M, M, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Start static and close to the plain residual (HC, arXiv 2409.19606, App. J; mHC):
        - phi = 0: the maps start input-independent (HC: dynamic weights 0), so the alphas get
          no gradient until phi has moved; a_pre = a_post = a_res = 0.01 (mHC Table 5);
        - b_res: diagonal 0, off-diagonal -8, so H_res = Sinkhorn(b_res) ~ I (diagonal 0.999,
          off-diagonal 3.4e-4 at M = 4; the mHC-lite convention, arXiv 2601.05732);
        - b_post = 0: H_post = 2 sigmoid(0) = 1, F's output added to every stream (HC: B = 1);
        - b_pre: +2 on stream layer_index % M, -2 elsewhere: H_pre ~ (0.88 on the own
          stream, 0.12 on each other). HC starts H_pre at the one-hot e_{layer mod M}; a
          uniform 1/M start (mHC Table 1's fixed map) would keep the copied streams identical
          forever (the init is symmetric in the streams), and +-2 rather than +-8 keeps the
          sigmoid's slope at 0.1, not 3e-4. The sum (1 + 0.12 (M-1)) only scales F's input,
          which F's own pre-norm removes.
        """
        if self.n_streams == 1:
            return
        M = self.n_streams
        nn.init.zeros_(self.phi)
        for alpha in (self.alpha_pre, self.alpha_post, self.alpha_res):
            nn.init.constant_(alpha, ALPHA_INIT)
        self.bias_pre.fill_(-PRE_LOGIT)
        self.bias_pre[self.layer_index % M] = PRE_LOGIT
        nn.init.zeros_(self.bias_post)
        eye = torch.eye(M, device=self.bias_res.device, dtype=torch.bool)
        self.bias_res.copy_(torch.where(eye, 0.0, RES_OFF_DIAG_LOGIT))

    def _check(self, x_BTMD: torch.Tensor) -> None:
        if x_BTMD.dim() != 4 or x_BTMD.shape[2:] != (self.n_streams, self.dim):
            raise ValueError(
                f"hyper-connection streams must be [B, T, M={self.n_streams}, D={self.dim}], got "
                f"{tuple(x_BTMD.shape)}; use expand_streams(h, {self.n_streams}) on [B, T, D] inputs"
            )

    def maps(self, x_BTMD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H_pre [B,T,M], H_post [B,T,M], H_res [B,T,M,M]) for these streams (eqs. 7-8), in
        the parameters' dtype."""
        self._check(x_BTMD)
        B, T, M, D = x_BTMD.shape
        if M == 1:
            ones_BTM = x_BTMD.new_ones(B, T, 1)
            return ones_BTM, ones_BTM, ones_BTM.unsqueeze(-1)
        # Flatten the streams ([B, T, M, D] -> [B, T, M*D]) and RMS-normalize without a gain:
        # a gain would be absorbed into phi anyway (mHC sec. 4.3.1). The maps are computed in
        # the parameters' dtype (float32 parameters with bf16 streams: mHC's mixed precision).
        x_BTK = x_BTMD.reshape(B, T, M * D).to(self.phi.dtype)
        xn_BTK = F.rms_norm(x_BTK, (M * D,), eps=self.norm_eps)
        logits = F.linear(xn_BTK, self.phi)  # [B, T, M + M + M*M]
        pre_BTM, post_BTM, res_flat = logits.split([M, M, M * M], dim=-1)
        h_pre = torch.sigmoid(self.alpha_pre * pre_BTM + self.bias_pre)
        h_post = 2 * torch.sigmoid(self.alpha_post * post_BTM + self.bias_post)
        res_BTMM = self.alpha_res * res_flat.unflatten(-1, (M, M)) + self.bias_res  # mat(): row-major
        return h_pre, h_post, sinkhorn(res_BTMM, self.sinkhorn_iters)

    def forward(self, x_BTMD: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if self.n_streams == 1:
            self._check(x_BTMD)
            return x_BTMD + fn(x_BTMD[:, :, 0]).unsqueeze(2)  # exactly the ordinary residual
        h_pre, h_post, h_res = (h.to(x_BTMD.dtype) for h in self.maps(x_BTMD))
        y_BTD = fn(torch.einsum("btm,btmd->btd", h_pre, x_BTMD))  # F(H_pre x)
        if y_BTD.shape != x_BTMD.shape[:2] + (self.dim,):
            raise ValueError(f"fn must map [B, T, D] to [B, T, D], got {tuple(y_BTD.shape)}")
        mixed_BTMD = torch.einsum("btij,btjd->btid", h_res, x_BTMD)  # out_i = sum_j H_res[i, j] x_j
        return mixed_BTMD + h_post.unsqueeze(-1) * y_BTD.unsqueeze(2)  # + H_post^T F(...)

    def extra_repr(self) -> str:
        return (f"D={self.dim}, M={self.n_streams}, layer_index={self.layer_index}, "
                f"sinkhorn_iters={self.sinkhorn_iters}")
