"""transformers' Qwen4Exp n-gram memory (`Qwen4ExpTextPLELayer`) as our objects: its hash layout
as a `HashLayout` and each memory layer as an `Engram` module with its weights, so our hasher,
analysis, offload, cache and editing tools work on such models.

The PLE layer is the paper's Engram module with hyper-connection streams (hc_count = M): a fused
value/key projection without bias, per-stream RMSNorms (stored as 1 + w), the signed-square-root
gate and a dilated causal conv. Its table is one embedding padded to a multiple of 128 rows
(`HashLayout.row_multiple`); the padding rows are never addressed and are not copied.
`to_qwen4exp` writes the (edited) modules back, so a memory changed with our tools ships in the
model's own format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EngramConfig
from ..hashing.layout import HashLayout
from ..hashing.ngram import NgramHasher
from ..hashing.qwen4exp import qwen4exp_layout
from ..memory.engram import Engram


@dataclass
class Qwen4ExpMemory:
    layout: HashLayout
    hasher: NgramHasher
    engrams: dict[int, Engram]  # decoder layer index -> the Engram module with that layer's weights


def _ple_layers(model_or_layer: nn.Module) -> list[nn.Module]:
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextPLELayer

    if isinstance(model_or_layer, Qwen4ExpTextPLELayer):
        return [model_or_layer]
    layers = [m for m in model_or_layer.modules() if isinstance(m, Qwen4ExpTextPLELayer)]
    if not layers:
        raise ValueError(f"{type(model_or_layer).__name__} has no Qwen4Exp n-gram memory (Qwen4ExpTextPLELayer)")
    return layers


def _row_multiple(model_or_layer: nn.Module, given: int | None) -> int:
    """The table padding: given, else the model's config (`make_ngram_vocab_size_divisible_by`),
    else transformers' default of 128 (a bare layer does not keep its config)."""
    if given is not None:
        return given
    config = getattr(model_or_layer, "config", None)
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "make_ngram_vocab_size_divisible_by", 128))


def _layout_of(ples: list[nn.Module], row_multiple: int) -> HashLayout:
    """The layout of these PLE layers (sorted by memory index), checked against their buffers and
    table sizes, with each memory renamed to the decoder layer that holds it."""
    e0 = ples[0].ple_embedding
    n_memories = max(m.ple_embedding.ple_layer_index for m in ples) + 1
    layout = qwen4exp_layout(vocab_size=e0.unigram_vocab_size, layer_ids=range(n_memories), ngram_size=e0.ngram_size,
                             heads_per_ngram=e0.heads_per_ngram, ngram_vocab_size_base=e0.ngram_vocab_size_base,
                             seed=e0.seed, eos_token_id=e0.eos_token_id, row_multiple=row_multiple)
    # the layout by memory index, renamed to the decoder layers that hold each memory
    by_index = {m.ple_embedding.ple_layer_index: m.layer_idx for m in ples}
    layout = dataclasses.replace(layout, layer_ids=tuple(by_index[i] for i in sorted(by_index)),
                                 multipliers={by_index[i]: layout.multipliers[i] for i in by_index},
                                 primes={by_index[i]: layout.primes[i] for i in by_index})
    for ple in ples:
        emb = ple.ple_embedding
        if list(layout.primes[ple.layer_idx]) != list(emb.head_vocab_sizes) or \
                list(layout.multipliers[ple.layer_idx]) != emb.layer_multipliers.tolist():
            raise ValueError(f"Qwen4Exp layer {ple.layer_idx}: its buffers do not follow the Qwen4Exp layout rules "
                             "(a different transformers version?); refusing to guess its rows")
        if emb.ngram_embedding.weight.shape[0] != layout.stored_rows(ple.layer_idx):
            raise ValueError(
                f"Qwen4Exp layer {ple.layer_idx}: its table has {emb.ngram_embedding.weight.shape[0]} rows, the layout "
                f"stores {layout.stored_rows(ple.layer_idx)} ({emb.total_vocab_size} padded to a multiple of "
                f"{layout.row_multiple}); pass row_multiple= as its config's make_ngram_vocab_size_divisible_by")
    return layout


@torch.no_grad()
def from_qwen4exp(model_or_layer: nn.Module, row_multiple: int | None = None) -> Qwen4ExpMemory:
    """The hash layout and Engram modules of a Qwen4Exp model (or of one of its PLE layers).
    With a single layer, the layout holds that layer only (its memory index is kept).
    `row_multiple`: the table padding, when a bare layer was built with a non-default one."""
    ples = sorted(_ple_layers(model_or_layer), key=lambda m: m.ple_embedding.ple_layer_index)
    layout = _layout_of(ples, _row_multiple(model_or_layer, row_multiple))
    n_heads = ples[0].ple_embedding.ngram_heads
    engrams = {}
    for ple in ples:
        emb = ple.ple_embedding
        D, M = ple.hidden_size, ple.hc_count
        d_mem = emb.ngram_embedding.weight.shape[1] * n_heads
        config = EngramConfig(
            compressed_vocab_size=layout.compressed_vocab_size, pad_id=layout.pad_id, layer_ids=layout.layer_ids,
            rows_per_head=layout.rows_per_head, max_ngram_size=layout.max_ngram_size,
            n_head_per_ngram=layout.n_head_per_ngram, n_embed_per_ngram=d_mem // (layout.max_ngram_size - 1),
            seed=layout.seed, kernel_size=ple.conv1d.kernel_size[0],
            use_short_conv=True, use_gate=True, bias=False, gate_norm_eps=ple.norm_key.eps,
            conv_norm_eps=ple.norm_conv.eps, conv_zero_init=False)
        dtype = ple.value_proj.weight.dtype
        engram = Engram(config, layout.primes[ple.layer_idx], hidden_size=D, n_streams=M, layer_id=ple.layer_idx,
                        dtype=dtype)
        engram.table.weight.copy_(emb.ngram_embedding.weight[:emb.total_vocab_size])
        engram.proj.weight.copy_(torch.cat([ple.value_proj.weight, ple.key_proj.weight]))
        engram.key_norm.weight.copy_((1 + ple.norm_key.weight.float()).view(M, D))
        engram.query_norm.weight.copy_((1 + ple.norm_query.weight.float()).view(M, D))
        engram.short_conv.norm.weight.copy_((1 + ple.norm_conv.weight.float()).view(M, D))
        engram.short_conv.weight.copy_(ple.conv1d.weight)
        engrams[ple.layer_idx] = engram
    return Qwen4ExpMemory(layout=layout, hasher=NgramHasher.from_layout(layout), engrams=engrams)


@torch.no_grad()
def to_qwen4exp(memory: Qwen4ExpMemory, model_or_layer: nn.Module) -> None:
    """Write `memory`'s Engram weights back into the model's PLE layers, in place (the inverse of
    `from_qwen4exp`; padding rows are left as they are). The model must have the same layout."""
    ples = sorted(_ple_layers(model_or_layer), key=lambda m: m.ple_embedding.ple_layer_index)
    diffs = memory.layout.mismatches(_layout_of(ples, memory.layout.row_multiple))  # no weights copied
    if diffs:
        raise ValueError("this memory was not read from a model with this layout: " + "; ".join(diffs))
    for ple in ples:
        engram = memory.engrams.get(ple.layer_idx)
        if engram is None:
            raise ValueError(f"the memory has no Engram for Qwen4Exp layer {ple.layer_idx} "
                             f"(it has layers {sorted(memory.engrams)})")
        emb, D = ple.ple_embedding, ple.hidden_size
        emb.ngram_embedding.weight[:emb.total_vocab_size].copy_(engram.table.weight)
        ple.value_proj.weight.copy_(engram.proj.weight[:D])
        ple.key_proj.weight.copy_(engram.proj.weight[D:])
        ple.norm_key.weight.copy_(engram.key_norm.weight.flatten() - 1)
        ple.norm_query.weight.copy_(engram.query_norm.weight.flatten() - 1)
        ple.norm_conv.weight.copy_(engram.short_conv.norm.weight.flatten() - 1)
        ple.conv1d.weight.copy_(engram.short_conv.weight)
