"""Causal grouped-query attention with RoPE, scaled_dot_product_attention and a KV cache.

Shape legend: B batch, S new positions, C cache capacity, H query heads, G kv heads, E head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .rope import apply_rope, rope_angles


@dataclass
class KVCache:
    """Keys and values of one layer in buffers of fixed capacity C: [B, G, C, E].

    Columns [0, length) are written. `length` is the decode state's counter (a 0-d tensor
    shared by every layer), so the write position is data, not a Python int: one compiled
    graph (or CUDA graph) serves every decode step, reading all C columns, of which the
    caller's mask hides the unwritten ones (zeros: finite, so they weigh exactly 0). An eager
    forward sets `start`, the host's count of written columns: it writes there and reads
    only the columns written so far, so its cost does not grow with the capacity.
    """

    k: torch.Tensor  # [B, G, C, E]
    v: torch.Tensor  # [B, G, C, E]
    length: torch.Tensor  # [] long, shared with DecodeState.length
    start: int | None = None  # set per forward by EngramLM: None = at `length`, all C columns

    def write(self, k_BGSE: torch.Tensor, v_BGSE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store S new keys and values at columns [length, length + S); return the buffers
        to attend over. The caller advances `length` once all layers have written."""
        S = k_BGSE.shape[2]
        if self.start is not None:
            end = self.start + S
            self.k[:, :, self.start:end] = k_BGSE
            self.v[:, :, self.start:end] = v_BGSE
            return self.k[:, :, :end], self.v[:, :, :end]
        cols_S = self.length.view(1) if S == 1 else self.length + torch.arange(S, device=self.length.device)
        self.k.index_copy_(2, cols_S, k_BGSE.to(self.k.dtype))
        self.v.index_copy_(2, cols_S, v_BGSE.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        D, E = config.hidden_size, config.attn_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, E
        self.rope_theta = config.rope_theta
        self.wq = nn.Linear(D, self.n_heads * E, bias=False, device=device, dtype=dtype)
        self.wk = nn.Linear(D, self.n_kv_heads * E, bias=False, device=device, dtype=dtype)
        self.wv = nn.Linear(D, self.n_kv_heads * E, bias=False, device=device, dtype=dtype)
        self.wo = nn.Linear(self.n_heads * E, D, bias=False, device=device, dtype=dtype)

    def forward(
        self, x_BSD: torch.Tensor, positions_BS: torch.Tensor | tuple[torch.Tensor, torch.Tensor], *,
        cache: KVCache | None = None, mask_BTK: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`positions_BS`: integer positions [B, S], or their `rope_angles` (cos, sin), which
        EngramLM computes once per forward for all blocks. `mask_BTK[b, i, j]`: may query i
        see key j (keys: the cache columns `cache.write` returns when a cache is given, else
        the S new positions). None: plain causal without a cache; with one, only for a single
        query after the written columns, all real tokens (an eager decode step without padding)."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, E]
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, G, S, E]
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if isinstance(positions_BS, torch.Tensor):
            positions_BS = rope_angles(positions_BS, self.head_dim, self.rope_theta)
        cos, sin = positions_BS
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if mask_BTK is None and (cache.start is None or S > 1):
                raise ValueError("attention over a KV cache needs mask_BTK (which cache columns each query "
                                 "may see); EngramLM.forward builds it from the decode state")
            k, v = cache.write(k, v)  # [B, G, K, E]: K columns, unwritten ones masked
        gqa = self.n_heads != self.n_kv_heads
        if mask_BTK is None:
            # without a cache: causal; over a cache without a mask there is one query (S = 1, checked
            # above), which sees every written column. A Python bool either way, so torch.export
            # traces it with a symbolic S.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTK.unsqueeze(1), enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))
