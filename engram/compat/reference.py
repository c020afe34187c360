"""Interop with the public demo (deepseek-ai/Engram, engram_demo_v1.py): config, weights, layout.

The demo's Engram differs from our defaults in ways that change numbers: Linear layers with
biases, a randomly initialized conv, gate RMSNorms with the dtype's default eps and conv
RMSNorms with 1e-5. `reference_engram` builds our module with exactly those settings, so a
state dict saved from the demo loads here and gives the demo's outputs.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..config import EngramConfig
from ..hashing.layout import HashLayout
from ..memory.engram import Engram


def reference_config(
    *, engram_vocab_size: Sequence[int], max_ngram_size: int, n_embed_per_ngram: int,
    n_head_per_ngram: int, layer_ids: Sequence[int], kernel_size: int, hidden_size: int,
    hc_mult: int, compressed_vocab_size: int, pad_id: int | None = None, compressed_pad_id: int | None = None,
    compression: Any = None, seed: int = 0,
) -> EngramConfig:
    """Our config for the demo's field names (its `EngramConfig` and `hc_mult`).

    The pad: the demo's `pad_id` is a *raw* token id, which it maps through the compression
    table; ours is a compressed id. Give the demo's `pad_id` together with `compression` (a
    `CompressedTokenizer` or its lookup table) and it is mapped the demo's way, or give
    `compressed_pad_id` directly. With neither, 2 (the demo's default, which DeepSeek-V3's
    compression maps to 2). `pad_id` alone is refused: an int that silently means another id
    would address other rows. `hidden_size` and `hc_mult` (the demo's width and stream count)
    are accepted with the demo's other fields but are not part of our config: our `Engram`
    takes them when it is built (`reference_engram` passes them). The tables are N(0, 1) as
    in the demo (`table_init_std=1.0`)."""
    if pad_id is not None and compressed_pad_id is not None:
        raise ValueError("give the demo's raw pad_id (with compression) or compressed_pad_id, not both")
    if pad_id is not None:
        if compression is None:
            raise ValueError(f"pad_id={pad_id} is the demo's raw token id, which the demo maps through its "
                             "compression table; pass compression=CompressedTokenizer(...) to map it the same way, "
                             "or give compressed_pad_id= (the id after compression)")
        table = np.asarray(getattr(compression, "lookup_table", compression))
        compressed_pad_id = int(table[pad_id])
    return EngramConfig(
        compressed_vocab_size=compressed_vocab_size, pad_id=2 if compressed_pad_id is None else compressed_pad_id,
        layer_ids=tuple(layer_ids),
        rows_per_head=tuple(engram_vocab_size), max_ngram_size=max_ngram_size,
        n_head_per_ngram=n_head_per_ngram, seed=seed,
        n_embed_per_ngram=n_embed_per_ngram, kernel_size=kernel_size, use_short_conv=True,
        conv_zero_init=False, use_gate=True, bias=True, gate_norm_eps=None, conv_norm_eps=1e-5,
        table_init_std=1.0,
    )


def reference_engram(
    *, layer_id: int, engram_vocab_size: Sequence[int], max_ngram_size: int, n_embed_per_ngram: int,
    n_head_per_ngram: int, layer_ids: Sequence[int], kernel_size: int, hidden_size: int, hc_mult: int,
    compressed_vocab_size: int, pad_id: int | None = None, compressed_pad_id: int | None = None,
    compression: Any = None, seed: int = 0, state_dict: Mapping[str, torch.Tensor] | None = None,
    layout: HashLayout | None = None,
) -> Engram:
    """Build the Engram module of `layer_id` from the demo's config fields (named as in the
    demo; a missing one is a TypeError naming it) and load a demo state dict. The pad as in
    `reference_config`. Pass `layout` to reuse a saved hash layout instead of recomputing the
    primes."""
    config = reference_config(
        engram_vocab_size=engram_vocab_size, max_ngram_size=max_ngram_size, n_embed_per_ngram=n_embed_per_ngram,
        n_head_per_ngram=n_head_per_ngram, layer_ids=layer_ids, kernel_size=kernel_size, hidden_size=hidden_size,
        hc_mult=hc_mult, compressed_vocab_size=compressed_vocab_size, pad_id=pad_id,
        compressed_pad_id=compressed_pad_id, compression=compression, seed=seed)
    if layout is None:
        layout = HashLayout.from_config(config)
    else:
        layout.check_matches(config, "the demo config")
    if layer_id not in layout.primes:
        raise ValueError(f"layer_id {layer_id} is not one of the Engram layers {list(config.layer_ids)}")
    module = Engram(config, layout.primes[layer_id], hidden_size=hidden_size, n_streams=hc_mult, layer_id=layer_id)
    if state_dict is not None:
        load_reference_state_dict(module, state_dict)
    return module


def _demo_names(module: Engram) -> dict[str, tuple[str, slice | int | None]]:
    """demo key -> (our parameter name, index into it) for one module."""
    D, M = module.hidden_size, module.n_streams
    names: dict[str, tuple[str, slice | int | None]] = {
        "multi_head_embedding.embedding.weight": ("table.weight", None),
        "value_proj.weight": ("proj.weight", slice(0, D)),
        "value_proj.bias": ("proj.bias", slice(0, D)),
        "short_conv.conv.weight": ("short_conv.weight", None),
    }
    for i in range(M):
        rows = slice(D * (1 + i), D * (2 + i))
        names[f"key_projs.{i}.weight"] = ("proj.weight", rows)
        names[f"key_projs.{i}.bias"] = ("proj.bias", rows)
        names[f"norm1.{i}.weight"] = ("key_norm.weight", i)  # demo: norm1 on the key
        names[f"norm2.{i}.weight"] = ("query_norm.weight", i)  # demo: norm2 on the hidden state
        names[f"short_conv.norms.{i}.weight"] = ("short_conv.norm.weight", i)
    return names


def _check_reference_module(module: Engram) -> None:
    c = module.config
    if not (c.bias and c.use_gate and c.use_short_conv):
        raise ValueError("the demo's layout needs bias=True, use_gate=True and use_short_conv=True; "
                         "build the module with reference_engram(...)")


def load_reference_state_dict(module: Engram, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy demo-named weights into `module`; every key must match in name and shape."""
    _check_reference_module(module)
    names = _demo_names(module)
    params = dict(module.named_parameters())
    state = dict(state_dict)
    offsets = state.pop("multi_head_embedding.offsets", None)
    if offsets is not None and not torch.equal(offsets.cpu().long(), module.table.offsets.cpu()):
        raise ValueError(
            "hash layout mismatch: the demo's table offsets "
            f"{offsets.tolist()[:4]}... differ from this layout's {module.table.offsets.tolist()[:4]}...; "
            "the weights were saved for other table sizes (engram_vocab_size, layer_ids or heads)"
        )
    missing = sorted(set(names) - set(state))
    unknown = sorted(set(state) - set(names))
    if missing or unknown:
        raise ValueError(f"demo state dict does not fit this module: missing {missing}, unexpected {unknown}")
    with torch.no_grad():
        for key, (ours, index) in names.items():
            target = params[ours] if index is None else params[ours][index]
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{key}: demo tensor has shape {tuple(value.shape)}, module expects "
                                 f"{tuple(target.shape)}")
            target.copy_(value)


def export_reference_state_dict(module: Engram) -> dict[str, torch.Tensor]:
    """The module's weights under the demo's key names (with its `offsets` buffer)."""
    _check_reference_module(module)
    params = dict(module.named_parameters())
    out = {key: (params[ours] if index is None else params[ours][index]).detach().clone()
           for key, (ours, index) in _demo_names(module).items()}
    out["multi_head_embedding.offsets"] = module.table.offsets.detach().clone()
    return out
