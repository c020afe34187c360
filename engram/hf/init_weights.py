"""`EngramLM.init_weights`, one module at a time, the way transformers initializes a model.

transformers builds a model, or loads one whose checkpoint lacks some weights, by calling
`_init_weights(module)` on every module (children first), and it marks the tensors it loaded
so its init functions (`transformers.initialization`) leave them alone. So each rule here
touches only the module's own tensors and goes through those guarded functions: a partly
loaded module keeps what was loaded (a plain `reset_parameters()` would, for example, rescale a
loaded Engram table by its init scale).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from ..memory.engram import Engram, ShortConv
from ..memory.table import MemoryTable
from ..model.hyper import ALPHA_INIT, PRE_LOGIT, RES_OFF_DIAG_LOGIT, HyperConnection
from ..model.moe import MoE, RoutedExperts
from ..model.transformer import EngramLM

STD = 0.02  # EngramLM.init_weights: N(0, 0.02); output projections N(0, 0.02 / sqrt(2 n_layers))
OUTPUTS = ("wo", "w_down")


def init_module(root: EngramLM, name: str, module: nn.Module) -> None:
    """Initialize `module` (named `name` inside `root`) as `root.init_weights()` would."""
    out_std = STD / math.sqrt(2 * root.config.n_layers)
    if module is root:
        if root.hasher is not None:
            init.copy_(root.compression, torch.from_numpy(root._compression_np).to(root.compression.device))
        return
    engram = _engram_of(root, name)
    if isinstance(module, MemoryTable):
        module.reset_buffers()
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and engram is not None:
            std = engram.config.table_init_std
            init.zeros_(weight) if std == 0 else init.normal_(weight, std=std)
    elif isinstance(module, Engram):
        return  # its children hold its parameters
    elif engram is not None and isinstance(module, nn.Linear):  # the key/value projection
        init.normal_(module.weight, std=engram.init_std / math.sqrt(engram.config.memory_dim))
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, ShortConv):
        init.zeros_(module.weight) if module.zero_init else init.kaiming_uniform_(module.weight, a=math.sqrt(5))
    elif isinstance(module, HyperConnection):
        _init_hyper(module)
    elif isinstance(module, RoutedExperts):
        for key in ("w_gate", "w_up", "w_down"):
            init.normal_(getattr(module, key), std=out_std if key in OUTPUTS else STD)
    elif isinstance(module, MoE):
        init.zeros_(module.router_bias)
        init.zeros_(module.expert_load)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, std=STD)
    elif isinstance(module, nn.Linear):
        if not (module is root.lm_head and root.config.tie_embeddings):
            init.normal_(module.weight, std=out_std if name.rsplit(".", 1)[-1] in OUTPUTS else STD)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif "RMSNorm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter):
        init.ones_(module.weight)


def _engram_of(root: EngramLM, name: str) -> Engram | None:
    """The Engram module `name` lies in, if any ("blocks.3.engram.proj" -> blocks[3].engram)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0] == "blocks" and parts[2] == "engram":
        return root.blocks[int(parts[1])].engram
    return None


def _init_hyper(hc: HyperConnection) -> None:
    """`HyperConnection.reset_parameters` through the guarded functions."""
    if hc.n_streams == 1:
        return
    M = hc.n_streams
    init.zeros_(hc.phi)
    for alpha in (hc.alpha_pre, hc.alpha_post, hc.alpha_res):
        init.constant_(alpha, ALPHA_INIT)
    pre = torch.full_like(hc.bias_pre, -PRE_LOGIT)
    pre[hc.layer_index % M] = PRE_LOGIT
    init.copy_(hc.bias_pre, pre)
    init.zeros_(hc.bias_post)
    eye = torch.eye(M, device=hc.bias_res.device, dtype=torch.bool)
    init.copy_(hc.bias_res, torch.where(eye, 0.0, RES_OFF_DIAG_LOGIT).to(hc.bias_res.dtype))
