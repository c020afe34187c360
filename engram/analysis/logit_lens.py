"""LogitLens: how close each block's hidden state already is to the model's final prediction.

    kl = logit_lens_kl(model, ids)                      # numpy [n_layers]
    plot_logit_lens({"engram": kl_a, "moe": kl_b}, "logit_lens.png")

For block l with merged hidden state h_l (the model's `return_intermediates` output), the
lens prediction is p_l = softmax(lm_head(norm(h_l))) with the model's own final RMSNorm and
LM head, and the curve is KL(p_l || p_final) averaged over every position, p_final being the
model's output distribution. The last block's KL is 0 by construction (up to rounding when
the model computes in bfloat16). The paper (docs/paper.md, "Analysis") reports lower KL in early
layers with Engram: the memory hands the backbone static patterns that it would otherwise
rebuild layer by layer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

_CHUNK_ELEMENTS = 1 << 24  # positions x vocabulary per float64 chunk (~128 MB)


def _lens_log_probs(model: Any, h_ND: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head(norm(h))) in float64 from float32 matmuls (any model dtype)."""
    norm = model.norm
    weight = None if norm.weight is None else norm.weight.float()
    x = F.rms_norm(h_ND.float(), norm.normalized_shape, weight, norm.eps)
    return F.log_softmax(F.linear(x, model.lm_head.weight.float()).double(), dim=-1)


@torch.no_grad()
def logit_lens_kl(model: Any, ids_BT: torch.Tensor) -> np.ndarray:
    """Mean over all B*T positions of KL(p_l || p_final) for each block l -> float64 [n_layers].

    KL(p || q) = sum_v p_v (log p_v - log q_v), in float64. The model runs in eval mode without
    gradients; its training flag is restored afterwards and nothing else is touched."""
    ids_BT = torch.as_tensor(ids_BT)
    if ids_BT.dim() != 2 or ids_BT.numel() == 0:
        raise ValueError(f"ids must be a non-empty [batch, time] tensor, got shape {tuple(ids_BT.shape)}")
    was_training = model.training
    model.eval()
    try:
        device = model.lm_head.weight.device
        out = model(ids_BT.to(device), return_intermediates=True)
    finally:
        model.train(was_training)
    hidden = out.intermediates["hidden_states"]
    logits_NV = out.logits.reshape(-1, out.logits.shape[-1])
    N, V = logits_NV.shape
    chunk = max(1, _CHUNK_ELEMENTS // V)
    kl = np.zeros(len(hidden), dtype=np.float64)
    for layer, h_BTD in enumerate(hidden):
        h_ND = h_BTD.reshape(N, -1)
        total = 0.0
        for start in range(0, N, chunk):
            logp_nV = _lens_log_probs(model, h_ND[start:start + chunk])
            logq_nV = F.log_softmax(logits_NV[start:start + chunk].double(), dim=-1)
            total += float((logp_nV.exp() * (logp_nV - logq_nV)).sum())
        kl[layer] = total / N
    return kl


def plot_logit_lens(curves: Mapping[str, Any], path: str | os.PathLike, *, title: str | None = None) -> Path:
    """KL per block for several checkpoints on one PNG: linear y on the left, log y on the
    right (points with KL <= 1e-12, such as the last block, are left out of the log panel).
    x is the 0-based block index. Returns the path written."""
    if not curves:
        raise ValueError("give at least one curve: {label: KL per layer}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    lin, log = fig.subplots(1, 2)
    for label, values in curves.items():
        kl = np.asarray(values, dtype=np.float64).reshape(-1)
        x = np.arange(len(kl))
        lin.plot(x, kl, marker="o", label=str(label))
        positive = kl > 1e-12
        log.plot(x[positive], kl[positive], marker="o", label=str(label))
    log.set_yscale("log")
    for ax, scale in ((lin, "linear"), (log, "log")):
        ax.set_xlabel("block (0-based)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"KL(layer || final), nats ({scale})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "LogitLens: KL of each block's prediction from the final one")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
