"""One block: [Engram ->] attention -> MLP (dense or MoE), each on the hyper-connection streams.

    x <- x + Engram(x, rows)                      (all M streams; each stream gates itself)
    x <- HC_attn(x, h -> Attention(RMSNorm(h)))   (x_{l+1} = H_res x + H_post^T F(H_pre x))
    x <- HC_mlp(x, h -> MLP(RMSNorm(h)))
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..memory.engram import Engram, ShortConvState
from .attention import Attention, KVCache
from .hyper import HyperConnection
from .moe import MLP, MoE


class Block(nn.Module):
    def __init__(
        self, config: ModelConfig, layer: int, *, table_sizes: Sequence[int] | None = None,
        device=None, dtype=None,
    ) -> None:
        super().__init__()
        D, M = config.hidden_size, config.n_streams
        self.layer = layer
        self.engram = None
        if config.engram is not None and layer in config.engram.layer_ids:
            self.engram = Engram(config.engram, table_sizes, hidden_size=D, n_streams=M, layer_id=layer,
                                 device=device, dtype=dtype)
        self.attn_norm = nn.RMSNorm(D, eps=config.norm_eps, device=device, dtype=dtype)
        self.attn = Attention(config, device=device, dtype=dtype)
        self.mlp_norm = nn.RMSNorm(D, eps=config.norm_eps, device=device, dtype=dtype)
        if config.is_moe_layer(layer):
            self.mlp = MoE(D, config.moe, device=device, dtype=dtype)
        else:
            self.mlp = MLP(D, config.mlp_hidden_size, device=device, dtype=dtype)
        hc = dict(sinkhorn_iters=config.sinkhorn_iters, norm_eps=config.norm_eps, device=device, dtype=dtype)
        self.hc_attn = HyperConnection(D, M, layer_index=2 * layer, **hc)
        self.hc_mlp = HyperConnection(D, M, layer_index=2 * layer + 1, **hc)

    def forward(
        self, x_BTMD: torch.Tensor, positions_BT: torch.Tensor, *, rows_BTH: torch.Tensor | None = None,
        cache: KVCache | None = None, mask_BTK: torch.Tensor | None = None,
        conv_state: ShortConvState | None = None, valid_BT: torch.Tensor | None = None,
        record: dict | None = None,
    ) -> torch.Tensor:
        if self.engram is not None:
            out = self.engram(x_BTMD, rows_BTH, conv_state=conv_state, valid_BT=valid_BT,
                              return_gates=record is not None)
            if record is not None:
                out, record["gates"] = out
            x_BTMD = x_BTMD + out
        x_BTMD = self.hc_attn(
            x_BTMD, lambda h: self.attn(self.attn_norm(h), positions_BT, cache=cache, mask_BTK=mask_BTK))
        return self.hc_mlp(x_BTMD, lambda h: self.mlp(self.mlp_norm(h)))
