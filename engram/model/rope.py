"""Rotary position embedding with explicit per-sequence positions.

Positions are passed in (not implied by the index) so a left-padded batch and a decode step
that continues a cache rotate each token by its true position. `EngramLM` computes the
angles once per forward (`rope_angles`) and every block's attention reuses them.
"""

from __future__ import annotations

import torch

from ..precision import upcast


def rope_angles(positions_BS: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, 1, S, head_dim] (float32) for integer positions: the head_dim/2
    frequencies, repeated for the two halves `apply_rope` rotates against each other."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions_BS.device, dtype=torch.float32) / head_dim)
    angles = positions_BS.to(torch.float32).unsqueeze(-1) * inv_freq  # [B, S, hd/2]
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # [B, 1, S, hd]
    return angles.cos(), angles.sin()


def apply_rope(x_BHSE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head vector:
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), as x cos + (-x2, x1) sin in 5 ops, bit for
    bit the same numbers (a - b is a + (-b) in IEEE arithmetic, and + commutes)."""
    x = upcast(x_BHSE)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_BHSE.dtype)
