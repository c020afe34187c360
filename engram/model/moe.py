"""SwiGLU MLP and DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 style).

Shape legend: N tokens (all leading dims flattened), D model width, F expert hidden width,
E routed experts, K experts chosen per token (top_k), S = N * K (token, slot) pairs.

    s_NE   = sigmoid(x W_r^T)                     in float32
    idx_NK = top_k(s_NE + b_E)                    the bias b only picks experts
    w_NK   = route_scale * s[idx] / sum_k s[idx]  weights ignore the bias
    y      = shared(x) + sum_k w_k * expert_{idx_k}(x)

No capacity limit and no token dropping: a token's output depends on that token alone, so
chunked decoding equals the full forward. Balancing happens outside `forward`: training
forwards count how many tokens picked each expert, and after `optimizer.step()` the
training loop calls `update_bias()`, which nudges b toward under-loaded experts.

The routed experts run as three grouped matmuls over the (token, slot) pairs sorted by
expert, with the group ends `offs_E` computed on the device (`searchsorted` on the sorted
expert ids): no per-expert Python loop, no host sync, static shapes, so `torch.compile`
traces forward and backward in one graph. `torch._grouped_mm` is that matmul: CUDA's
grouped GEMM for bf16 (autocast included) on sm90+; on CPU (fp32, bf16, fp16) a C++ loop of
one matmul per expert, bit-identical in fp32 to the Python loop it replaced. Padded batched
matmuls (`bmm` over [E, C, D]) would need a static capacity C; without token dropping C is
N*K, E times the work. Elsewhere (CUDA in fp32, or before sm90) torch's fallback reads the
group ends on the host (one sync). The old loop stays as `RoutedExperts.forward_loop`, the
oracle the tests hold the grouped path equal to.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from ..precision import upcast


class MLP(nn.Module):
    """SwiGLU: w_down(silu(w_gate x) * w_up x), on any leading shape [..., D]."""

    def __init__(self, dim: int, hidden_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.w_up = nn.Linear(dim, hidden_size, bias=False, device=device, dtype=dtype)
        self.w_down = nn.Linear(hidden_size, dim, bias=False, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All three weights N(0, 0.02)."""
        for lin in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(lin.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The grouped product one group at a time, for dtypes torch._grouped_mm has no kernel for
    (float64: exactness tests). Reads the offsets on the host."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:  # a [S, D] x b [E, D, F] -> [S, F]
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for e, (s, t) in enumerate(zip(starts, ends)):
            out[s:t] = a[s:t] @ b[e]
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[1])  # a [D, S] x b [S, F] -> [E, D, F]
    for e, (s, t) in enumerate(zip(starts, ends)):
        out[e] = a[:, s:t] @ b[s:t]
    return out


def _grouped_mm_impl(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.float64:
        return _grouped_mm_loop(a, b, offs)
    if a.dtype in (torch.bfloat16, torch.float16) and not _aligned(a, b):
        return torch._grouped_mm(a.float(), b.float(), offs=offs).to(a.dtype)  # needs 16-byte strides
    return torch._grouped_mm(a, b, offs=offs)


@torch.library.custom_op("engram::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm for any float dtype. a [S, D] x b [E, D, F] -> [S, F] (groups of rows),
    or a [D, S] x b [S, F] -> [E, D, F] (groups along S: the weight gradient)."""
    return _grouped_mm_impl(a, b, offs)


@_grouped_mm_op.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


def _grouped_mm_setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad_SF):
    a_SD, b_EDF, offs = ctx.saved_tensors
    grad_a = _grouped_mm_op(grad_SF, b_EDF.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_b = _grouped_mm_op(a_SD.t(), grad_SF, offs) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _aligned(*tensors: torch.Tensor) -> bool:
    """torch._grouped_mm's low-precision kernels want 16-byte aligned strides."""
    return all(s % (16 // t.element_size()) == 0 for t in tensors for s in t.stride()[:-1] if s != 1)


def grouped_mm(x_SD: torch.Tensor, w_EDF: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows offs[e-1]:offs[e] of x times w[e], for every expert e, in one call: [S, D] -> [S, F].

    bf16 with aligned strides calls `torch._grouped_mm` itself (CUDA's grouped GEMM on sm90+,
    compiled by inductor); every other case goes through the `engram::grouped_mm` custom op,
    which runs the same kernel eagerly but lets `torch.compile` trace it (torch's own meta
    function accepts only bf16); float64 loops over the groups. Under autocast both operands
    take the autocast dtype.
    """
    if torch.is_autocast_enabled(x_SD.device.type):
        dtype = torch.get_autocast_dtype(x_SD.device.type)
        x_SD, w_EDF = x_SD.to(dtype), w_EDF.to(dtype)
    if x_SD.dtype == torch.bfloat16 and _aligned(x_SD, w_EDF):
        return torch._grouped_mm(x_SD, w_EDF, offs=offs_E)
    return _grouped_mm_op(x_SD, w_EDF, offs_E)


class RoutedExperts(nn.Module):
    """E SwiGLU experts with stacked weights; runs tokens already sorted by expert."""

    def __init__(self, n_experts: int, dim: int, hidden_size: int, *, device=None, dtype=None) -> None:
        super().__init__()
        E, D, F_ = n_experts, dim, hidden_size
        self.w_gate = nn.Parameter(torch.empty(E, F_, D, device=device, dtype=dtype))
        self.w_up = nn.Parameter(torch.empty(E, F_, D, device=device, dtype=dtype))
        self.w_down = nn.Parameter(torch.empty(E, D, F_, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """All expert weights N(0, 0.02), like `MLP`."""
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, mean=0.0, std=0.02)

    def forward(self, x_SD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """x_SD holds expert 0's rows, then expert 1's, ...; `offs_E` (int32, on x's device)
        is where each expert's rows end. Experts with no rows get exactly zero gradient."""
        h_SF = F.silu(grouped_mm(x_SD, self.w_gate.transpose(-2, -1), offs_E)) * grouped_mm(
            x_SD, self.w_up.transpose(-2, -1), offs_E)
        return grouped_mm(h_SF, self.w_down.transpose(-2, -1), offs_E)

    def forward_loop(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The per-expert loop that `forward` replaced, kept as its test oracle and benchmark
        baseline: counts[e] rows for expert e (host ints: one sync to get them)."""
        out_SD = torch.empty_like(x_SD)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            x_nD = x_SD[start:start + n]
            h_nF = F.silu(x_nD @ self.w_gate[e].T) * (x_nD @ self.w_up[e].T)
            out_SD[start:start + n] = h_nF @ self.w_down[e].T
            start += n
        return out_SD

    def extra_repr(self) -> str:
        E, F_, D = self.w_gate.shape
        return f"E={E}, D={D}, F={F_}"


class MoE(nn.Module):
    """Shared experts + top-k routed experts with a loss-free balancing bias.

    `forward(x [..., D], return_routing=False) -> y [..., D]` or `(y, {"experts": [..., K]
    long, "weights": [..., K]})`. The shared experts are one MLP of width
    `config.shared_width` (n_shared * F unless set): a sum of SwiGLUs with disjoint hidden
    units is one wider SwiGLU.
    With top_k = 1 the normalized weight is always route_scale, so the router gets no
    gradient (only the bias steers it); DeepSeek-V3 uses top_k = 8.
    """

    def __init__(self, dim: int, config: MoEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        c = config
        self.dim, self.config = dim, c
        E, F_ = c.n_routed_experts, c.expert_hidden_size
        self.shared = (MLP(dim, c.shared_width, device=device, dtype=dtype)
                       if c.n_shared_experts > 0 else None)
        self.experts = RoutedExperts(E, dim, F_, device=device, dtype=dtype)
        self.router = nn.Linear(dim, E, bias=False, device=device, dtype=dtype)
        # Balancing state is float32 whatever the model dtype: small steps must not round away.
        self.register_buffer("router_bias", torch.zeros(E, device=device, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(E, device=device, dtype=torch.float32),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Router and experts N(0, 0.02); balancing bias and load counts zero."""
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        self.experts.reset_parameters()
        if self.shared is not None:
            self.shared.reset_parameters()
        with torch.no_grad():
            self.router_bias.zero_()
            self.expert_load.zero_()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick K experts per token (by score + bias) and their weights (by score alone)."""
        logits_NE = F.linear(upcast(x_ND), upcast(self.router.weight))
        scores_NE = torch.sigmoid(logits_NE)
        experts_NK = torch.topk(scores_NE + self.router_bias, self.config.top_k, dim=-1).indices
        picked_NK = scores_NE.gather(-1, experts_NK)
        weights_NK = picked_NK / picked_NK.sum(-1, keepdim=True) * self.config.route_scale
        return experts_NK, weights_NK

    def forward(
        self, x: torch.Tensor, return_routing: bool = False, *, loop: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`loop=True` runs the experts one by one (`RoutedExperts.forward_loop`), the reference
        that the grouped path must equal; it syncs with the host once."""
        D, K, E = self.dim, self.config.top_k, self.config.n_routed_experts
        if x.dim() < 1 or x.shape[-1] != D:
            raise ValueError(f"MoE expects inputs of shape [..., D={D}], got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x_ND = x.reshape(-1, D)  # flatten all leading dims into tokens
        experts_NK, weights_NK = self.route(x_ND)

        # Dispatch: sort the N*K (token, slot) pairs by expert so each expert's rows are contiguous.
        experts_S = experts_NK.flatten()  # pair s = token s // K, slot s % K
        sorted_S, order_S = torch.sort(experts_S, stable=True)
        token_S = order_S // K
        # offs[e] = pairs routed to experts 0..e; static shape, stays on the device (no sync)
        offs_E = torch.searchsorted(sorted_S, torch.arange(1, E + 1, device=x.device), out_int32=True)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.diff(offs_E, prepend=offs_E.new_zeros(1)).float()

        if loop:
            out_SD = self.experts.forward_loop(x_ND[token_S], torch.bincount(experts_S, minlength=E).tolist())
        else:
            out_SD = self.experts(x_ND[token_S], offs_E)
        out_SD = out_SD * weights_NK.flatten()[order_S].unsqueeze(-1).to(out_SD.dtype)

        y_ND = self.shared(x_ND) if self.shared is not None else torch.zeros_like(x_ND)
        y_ND = y_ND.index_add(0, token_S, out_SD.to(y_ND.dtype))  # combine: sum each token's K outputs
        y = y_ND.reshape(x.shape)
        if not return_routing:
            return y
        routing = {"experts": experts_NK.reshape(*lead, K), "weights": weights_NK.reshape(*lead, K)}
        return y, routing

    def _apply(self, fn, recurse: bool = True):
        """Keep the balancing buffers float32 through `.to(dtype)` / `.half()` / `.bfloat16()`
        (bias steps of 1e-3 round away in bf16, and bf16 counts stop being exact at 257),
        while still following device moves."""
        fp32 = {name: self._buffers[name] for name in ("router_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, before in fp32.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:  # fn cast it: take the device, keep the float32 values
                self._buffers[name] = before.to(after.device)
        return self

    @torch.no_grad()
    def update_bias(self) -> dict[str, float]:
        """Loss-free balancing step: b += gamma * sign(mean load - load), then reset the counts.

        Returns the load statistics measured before the reset: `max_violation` =
        (max load - mean load) / mean load (0.0 when no tokens were counted) and `tokens`.
        """
        load_E = self.expert_load
        total = float(load_E.sum())
        mean = total / load_E.numel()
        violation = (float(load_E.max()) - mean) / mean if total > 0 else 0.0
        if total > 0:
            self.router_bias += self.config.bias_update_rate * torch.sign(mean - load_E)
        load_E.zero_()
        return {"max_violation": violation, "tokens": total / self.config.top_k}

    def extra_repr(self) -> str:
        c = self.config
        return (f"D={self.dim}, E={c.n_routed_experts}, K={c.top_k}, F={c.expert_hidden_size}, "
                f"shared={c.n_shared_experts}")
