"""The Engram module: look up N-gram memory, gate it by context, add it to the residual.

Shape legend: B batch, T time, M hyper-connection streams, D model width, H hash tables
(heads) per layer, E row width, d_mem = H * E.

    e_t   = concat_h table_h[row_h(t)]                         (docs/paper.md step 4)
    k_m   = W_K^m e_t,  v = W_V e_t                            (step 5; one fused matmul)
    s_m   = RMSNorm_m(h_{t,m}) . RMSNorm_m(k_m) / sqrt(D)
    a_m   = sigmoid(sign(s_m) * sqrt(max(|s_m|, 1e-6)))
    v~_m  = a_m * v
    Y_m   = v~_m + SiLU(Conv1D(RMSNorm_m(v~)))_m                (step 6; depthwise, causal,
                                                                 dilation N; zero-init)
The caller adds Y to the hidden state (step 7). Row ids come from `NgramHasher`, outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EngramConfig
from ..precision import upcast
from .in_memory import InMemoryTable
from .table import MemoryTable


class StreamRMSNorm(nn.Module):
    """M independent RMSNorms over D, applied to [..., M, D] in one call."""

    def __init__(self, n_streams: int, dim: int, eps: float | None, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(n_streams, dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x_MD: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_MD, (self.dim,), eps=self.eps) * self.weight


@dataclass
class ShortConvState:
    """Conv input history for decoding: the last (kernel-1)*dilation normalized inputs. With
    `keep_trail`, each forward also keeps `trail`, the history it started from followed by its T
    new inputs [B, ctx + T, M*D], so the state can be rolled back into that forward."""

    history: torch.Tensor | None = None  # [B, (kernel-1)*dilation, M*D]
    keep_trail: bool = False
    trail: torch.Tensor | None = None


class ShortConv(nn.Module):
    """Depthwise causal Conv1D over time with dilation, on RMSNorm'd streams, then SiLU.

    Computed as `kernel_size` shifted multiply-adds in [B, T, channels] layout: the same sums
    as `F.conv1d` on [B, channels, T] without the two transposes, and about half the time
    forward + backward on CPU (docs/LOG.md). The weight keeps conv1d's [channels, 1, kernel].
    """

    def __init__(
        self, n_streams: int, dim: int, kernel_size: int, dilation: int, eps: float | None,
        zero_init: bool = True, device=None, dtype=None,
    ) -> None:
        super().__init__()
        self.n_streams, self.dim = n_streams, dim
        self.kernel_size, self.dilation, self.zero_init = kernel_size, dilation, zero_init
        self.norm = StreamRMSNorm(n_streams, dim, eps, device=device, dtype=dtype)
        # [channels, 1, kernel]: channel c = m * D + d (stream-major), one filter per channel.
        self.weight = nn.Parameter(torch.empty(n_streams * dim, 1, kernel_size, device=device, dtype=dtype))
        self.reset_parameters()

    @property
    def context(self) -> int:
        """How many past steps one output sees beyond its own."""
        return (self.kernel_size - 1) * self.dilation

    def reset_parameters(self) -> None:
        self.norm.reset_parameters()
        if self.zero_init:
            nn.init.zeros_(self.weight)  # SiLU(0) = 0: the module starts as a plain gated add
        else:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv1d's default

    def forward(self, v_BTMD: torch.Tensor, state: ShortConvState | None = None) -> torch.Tensor:
        B, T, M, D = v_BTMD.shape
        C, ctx = M * D, self.context
        if state is not None and state.history is not None:
            left = state.history
            if left.shape != (B, ctx, C):
                raise ValueError(
                    f"short-conv history has shape {tuple(left.shape)}, expected {(B, ctx, C)}; "
                    "reset the decode state when the batch changes"
                )
            if T == 1 and ctx > 0:
                return self._step(v_BTMD, state)
            left = left.to(v_BTMD.dtype)
        else:
            left = v_BTMD.new_zeros(B, ctx, C)  # zeros before the sequence start
        x_BTC = self.norm(v_BTMD).reshape(B, T, C)
        full = torch.cat([left, x_BTC], dim=1)  # [B, ctx + T, C]
        if state is not None and state.keep_trail:
            state.trail = full.detach()
        if state is not None:
            history = full[:, full.shape[1] - ctx:].detach()
            if state.history is None:
                state.history = history
            else:  # in place: the decode state keeps its buffers (compiled steps, CUDA graphs)
                state.history.copy_(history)
        w_KC = self.weight[:, 0, :].t()
        # tap j reads position t - (kernel-1-j)*dilation, i.e. column t + j*dilation of `full`
        y_BTC = full[:, :T] * w_KC[0]
        for j in range(1, self.kernel_size):
            y_BTC = torch.addcmul(y_BTC, full[:, j * self.dilation : j * self.dilation + T], w_KC[j])
        return F.silu(y_BTC).reshape(B, T, M, D)

    def from_taps(self, taps_BKC: torch.Tensor) -> torch.Tensor:
        """The conv output [B, C] from its K normalized inputs per position, oldest first
        (`norm(v)` at t - (K-1)*dilation, ..., t; zeros before a sequence start): for callers
        that keep the history themselves, such as a serving engine's paged per-token store.
        The same sums as `forward`, in the same order."""
        w_KC = self.weight[:, 0, :].t()
        y_BC = taps_BKC[:, 0] * w_KC[0]
        for j in range(1, self.kernel_size):
            y_BC = torch.addcmul(y_BC, taps_BKC[:, j], w_KC[j])
        return F.silu(y_BC)

    def _step(self, v_B1MD: torch.Tensor, state: ShortConvState) -> torch.Tensor:
        """One decode step: the same sums as `forward` in fewer ops (decode time is per-op
        overhead, docs/LOG.md). The RMSNorm as a per-row scalar, and the K taps read at once:
        the history plus the new input are ctx + 1 = (K-1)*dilation + 1 columns, and columns
        0, dilation, ..., ctx are the taps, oldest first."""
        B, _, M, D = v_B1MD.shape
        eps = self.norm.eps if self.norm.eps is not None else torch.finfo(v_B1MD.dtype).eps
        r_B1M1 = torch.rsqrt(torch.linalg.vector_norm(v_B1MD, dim=-1, keepdim=True).square() / D + eps)
        x_B1C = (v_B1MD * r_B1M1 * self.norm.weight).view(B, 1, M * D)
        full = torch.cat([state.history.to(x_B1C.dtype), x_B1C], dim=1)  # [B, ctx + 1, C]
        if state.keep_trail:
            state.trail = full
        state.history.copy_(full[:, 1:])
        y_B1C = (full[:, ::self.dilation] * self.weight[:, 0, :].t()).sum(1, keepdim=True)
        return F.silu(y_B1C).view(B, 1, M, D)


class Engram(nn.Module):
    """One Engram layer. `forward(hidden [B,T,M,D] or [B,T,D], rows [B,T,H]) -> same shape as hidden`.

    `table_sizes` are the layer's primes (`NgramHasher.table_sizes[layer_id]`). `hidden_size`
    (D) and `n_streams` (M) are the model's width and hyper-connection streams (a model passes
    its own). `table` may be any `MemoryTable` (host, disk, sharded ...); by default an
    `InMemoryTable`. `init_std`: the value projection starts at the residual stream's scale
    (`reset_parameters`).
    """

    def __init__(
        self, config: EngramConfig, table_sizes: Sequence[int], *, hidden_size: int, n_streams: int,
        layer_id: int | None = None, table: MemoryTable | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None, init_std: float = 0.02,
    ) -> None:
        super().__init__()
        c = config
        if hidden_size < 1 or n_streams < 1:
            raise ValueError(f"Engram needs the model's width and streams >= 1 (n_streams 1: plain residual), "
                             f"got hidden_size={hidden_size}, n_streams={n_streams}")
        if len(table_sizes) != c.n_hash_heads:
            raise ValueError(
                f"got {len(table_sizes)} table sizes, config needs (max_ngram_size-1)*n_head_per_ngram "
                f"= {c.n_hash_heads}; pass NgramHasher.table_sizes[layer_id]"
            )
        self.config, self.layer_id, self.init_std = c, layer_id, init_std
        self.hidden_size, self.n_streams = hidden_size, n_streams
        D, M = hidden_size, n_streams
        self.table = table if table is not None else InMemoryTable(
            table_sizes, c.row_dim, device=device, dtype=dtype)
        if table is None:  # a table passed in keeps its rows
            self._scale_table()
        if tuple(self.table.table_sizes) != tuple(table_sizes) or self.table.embedding_dim != c.row_dim:
            raise ValueError(
                f"table has sizes {self.table.table_sizes} x {self.table.embedding_dim}, expected "
                f"{tuple(table_sizes)} x {c.row_dim}"
            )
        # One matmul for W_V (rows 0:D) and the M keys W_K^m (rows D(1+m):D(2+m)).
        n_out = D * (1 + M) if c.use_gate else D
        self.proj = nn.Linear(c.memory_dim, n_out, bias=c.bias, device=device, dtype=dtype)
        if c.use_gate:
            self.key_norm = StreamRMSNorm(M, D, c.gate_norm_eps, device=device, dtype=dtype)
            self.query_norm = StreamRMSNorm(M, D, c.gate_norm_eps, device=device, dtype=dtype)
        self.short_conv = ShortConv(
            M, D, c.kernel_size, dilation=c.max_ngram_size, eps=c.conv_norm_eps,
            zero_init=c.conv_zero_init, device=device, dtype=dtype,
        ) if c.use_short_conv else None
        self._reset_proj()  # the table, norms and conv initialize themselves

    def _reset_proj(self) -> None:
        """proj N(0, init_std / sqrt(d_mem)), bias 0: with N(0, 1) table rows, the value (and
        each key) starts with rms init_std, the residual stream's scale (with zero rows it starts
        at zero and grows at that scale as the rows learn). nn.Linear's default
        (value rms 1/sqrt(3)) drowned the residual stream and cost 0.65 nats (docs/LOG.md)."""
        nn.init.normal_(self.proj.weight, std=self.init_std / math.sqrt(self.config.memory_dim))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    @torch.no_grad()
    def _scale_table(self) -> None:
        """Rows drawn N(0, 1) by the table become N(0, table_init_std^2) (trainable tables only:
        a disk table's rows are its file's)."""
        weight = getattr(self.table, "weight", None)
        if self.config.table_init_std != 1.0 and isinstance(weight, torch.Tensor) and not weight.is_meta:
            weight.mul_(self.config.table_init_std)

    def reset_parameters(self) -> None:
        """Table N(0, table_init_std^2) (0 by default: zero rows); projection N(0, init_std / sqrt(d_mem)),
        bias 0; norms 1; conv 0."""
        self.table.reset_parameters()
        self._scale_table()
        self._reset_proj()
        for norm in (getattr(self, "key_norm", None), getattr(self, "query_norm", None)):
            if norm is not None:
                norm.reset_parameters()
        if self.short_conv is not None:
            self.short_conv.reset_parameters()

    def forward(
        self, hidden: torch.Tensor, rows_BTH: torch.Tensor, *,
        conv_state: ShortConvState | None = None, valid_BT: torch.Tensor | None = None,
        return_gates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`valid_BT` (bool) marks real tokens in a left-padded batch: padded positions output
        zero and reach the short conv as the zeros it sees before a sequence starts."""
        c = self.config
        D, M = self.hidden_size, self.n_streams
        if isinstance(rows_BTH, dict):
            raise ValueError(f"got the rows of every Engram layer ({sorted(rows_BTH)}); pass this layer's: "
                             f"rows[{self.layer_id if self.layer_id is not None else 'layer_id'}]")
        flat = hidden.dim() == 3
        if flat and M == 1:
            hidden = hidden.unsqueeze(2)  # [B, T, D] -> [B, T, 1, D]
        if hidden.dim() != 4 or hidden.shape[2:] != (M, D):
            raise ValueError(
                f"hidden states must be [B, T, M={M}, D={D}]" + (" or [B, T, D]" if M == 1 else "")
                + f", got {tuple(hidden.shape)}"
            )
        B, T = hidden.shape[:2]
        if rows_BTH.shape[:2] != (B, T):
            raise ValueError(f"row ids {tuple(rows_BTH.shape)} must match hidden states' [B={B}, T={T}]")
        if (T == 1 and valid_BT is None and not return_gates and c.use_gate and self.short_conv is not None
                and conv_state is not None and conv_state.history is not None and self.short_conv.context > 0
                and not torch.is_grad_enabled()):
            out = self._step(hidden, rows_BTH, conv_state)
            return out.squeeze(2) if flat and M == 1 else out

        v_BTMD, gate_BTM = self.gated_value(hidden, rows_BTH)
        if valid_BT is not None:
            v_BTMD = v_BTMD * valid_BT.view(B, T, 1, 1).to(v_BTMD.dtype)
        out = v_BTMD if self.short_conv is None else v_BTMD + self.short_conv(v_BTMD, conv_state)
        if flat and M == 1:
            out = out.squeeze(2)
        return (out, gate_BTM) if return_gates else out

    def gated_value(self, hidden_BTMD: torch.Tensor, rows_BTH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v~ [B, T, M, D], gate [B, T, M]): the rows read, projected and gated by context,
        before the short conv. Each position depends on its own hidden state and rows only,
        so any batching of tokens (a serving engine's flat batch included) gives the same."""
        c = self.config
        D, M = self.hidden_size, self.n_streams
        mem_BTHE = self.table(rows_BTH)
        e_BTd = mem_BTHE.flatten(2).to(hidden_BTMD.dtype)  # concat heads: [B, T, H*E = d_mem]
        kv = self.proj(e_BTd)
        v_BTD = kv[..., :D]
        if c.use_gate:
            k_BTMD = kv[..., D:].unflatten(-1, (M, D))
            s_BTM = self._gate_logit(hidden_BTMD, k_BTMD)  # float32
            gate_BTM = torch.sigmoid(s_BTM.sign() * s_BTM.abs().clamp_min(1e-6).sqrt()).to(hidden_BTMD.dtype)
            return gate_BTM.unsqueeze(-1) * v_BTD.unsqueeze(2), gate_BTM
        B, T = hidden_BTMD.shape[:2]
        return v_BTD.unsqueeze(2).expand(B, T, M, D), hidden_BTMD.new_ones(B, T, M)

    def _step(self, h_B1MD: torch.Tensor, rows_B1H: torch.Tensor, conv_state: ShortConvState) -> torch.Tensor:
        """One decode step (no grad, gate and conv on): the numbers of `forward` in about half
        its ops, since a decode step's cost is the count of tiny ops, not their size
        (docs/LOG.md). The gate logit as in `_gate_logit`, with both norms folded into one
        rsqrt: r(h) r(k) / sqrt(D) = sqrt(D) / sqrt((|h|^2 + D eps)(|k|^2 + D eps))."""
        c = self.config
        D, M = self.hidden_size, self.n_streams
        B = h_B1MD.shape[0]
        eps = c.gate_norm_eps if c.gate_norm_eps is not None else torch.finfo(h_B1MD.dtype).eps
        e_Bd = self.table(rows_B1H).view(B, -1).to(h_B1MD.dtype)
        kv_BX = F.linear(e_Bd, self.proj.weight, self.proj.bias)
        h_BMD = upcast(h_B1MD.view(B, M, D))
        k_BMD = upcast(kv_BX[:, D:].view(B, M, D))
        w_MD = upcast(self.query_norm.weight) * upcast(self.key_norm.weight)
        norms_BM = (torch.linalg.vecdot(h_BMD, h_BMD) + D * eps) * (torch.linalg.vecdot(k_BMD, k_BMD) + D * eps)
        s_BM = torch.linalg.vecdot(h_BMD * w_MD, k_BMD) * norms_BM.rsqrt() * math.sqrt(D)
        gate_BM1 = torch.sigmoid(s_BM.sign() * s_BM.abs().clamp_min(1e-6).sqrt()).to(h_B1MD.dtype).unsqueeze(-1)
        v_B1MD = (gate_BM1 * kv_BX[:, None, :D]).view(B, 1, M, D)
        return v_B1MD + self.short_conv._step(v_B1MD, conv_state)

    def _gate_logit(self, h_BTMD: torch.Tensor, k_BTMD: torch.Tensor) -> torch.Tensor:
        """s = RMSNorm(h) . RMSNorm(k) / sqrt(D), per stream, in float32, without materializing
        either norm: RMSNorm(x) = x * r(x) * w with a per-row scalar r(x) = rsqrt(mean(x^2) + eps),
        so s = r(h) r(k) sum(h * k * w_q * w_k) / sqrt(D). Same numbers, fewer passes over
        [B,T,M,D]. float32 because in fp16 |h|^2 overflows once |h| passes 256 (every gate
        then sits at 0.5), and in bf16 rounding the products to 8 bits moves s, which the signed
        square root magnifies near s = 0. Returns float32; the caller casts the gate back."""
        D = self.hidden_size
        eps = self.config.gate_norm_eps
        if eps is None:  # what nn.RMSNorm(eps=None) uses: the input dtype's
            eps = torch.finfo(h_BTMD.dtype).eps
        h_BTMD, k_BTMD = upcast(h_BTMD), upcast(k_BTMD)  # no-ops (no copy) in float32 and float64
        w_MD = upcast(self.query_norm.weight) * upcast(self.key_norm.weight)
        # |h|^2 and |k|^2 in one reduction over the two stacked vectors
        sq_BTM2 = torch.linalg.vector_norm(torch.stack([h_BTMD, k_BTMD], dim=-2), dim=-1).square()
        r_BTM = torch.rsqrt(sq_BTM2 / D + eps).prod(-1)  # r(h) * r(k)
        dot_BTM = (h_BTMD * k_BTMD * w_MD).sum(-1)
        return dot_BTM * r_BTM * (1 / math.sqrt(D))

    def extra_repr(self) -> str:
        c = self.config
        return (f"layer_id={self.layer_id}, D={self.hidden_size}, M={self.n_streams}, H={c.n_hash_heads}, "
                f"E={c.row_dim}, conv={c.use_short_conv}, gate={c.use_gate}")
