"""Named model configurations, as functions. Layer ids are 0-based.

`tiny` and `small` run on a CPU (tests, the README's main job, benchmarks); `moe_27b` and
`engram_27b` are the paper's shapes (docs/paper.md "Training recipe") and are only meant to be
built on the meta device for accounting and planning. Keyword overrides replace fields:
`tiny(n_layers=6)`, `tiny(hidden_size=192, n_streams=4)` (Engram follows the model's width
and streams); `engram=False` gives the same backbone without Engram.
"""

from __future__ import annotations

import dataclasses

from .config import EngramConfig, ModelConfig, MoEConfig


def _finish(config: ModelConfig, engram: bool, overrides: dict) -> ModelConfig:
    if not engram:
        config = dataclasses.replace(config, engram=None)
    return dataclasses.replace(config, **overrides) if overrides else config


def tiny(*, engram: bool = True, vocab_size: int = 8192, compressed_vocab_size: int | None = None,
         pad_id: int = 0, **overrides) -> ModelConfig:
    """~1M backbone parameters, 4 blocks, MoE (8 experts, top-2), one Engram layer; M = 1."""
    D = 128
    return _finish(ModelConfig(
        vocab_size=vocab_size, hidden_size=D, n_layers=4, n_heads=4, n_kv_heads=2, mlp_hidden_size=384,
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden_size=128, first_k_dense=1),
        n_streams=1, max_seq_len=256,
        engram=EngramConfig(
            compressed_vocab_size=compressed_vocab_size or vocab_size, pad_id=pad_id, layer_ids=(1,),
            rows_per_head=(16384, 16384), max_ngram_size=3, n_head_per_ngram=4, n_embed_per_ngram=64),
    ), engram, overrides)


def small(*, engram: bool = True, vocab_size: int = 8192, compressed_vocab_size: int | None = None,
          pad_id: int = 0, rows_per_head: int = 507_500, **overrides) -> ModelConfig:
    """8 blocks of width 256, MoE (16 experts, top-2), M = 4 hyper-connection streams, Engram
    at blocks 1 and 4 with ~10x the backbone's parameters in its tables (train them with a
    row-sparse table optimizer: sparse_adam or row_adam). `rows_per_head`: for both orders."""
    D, M = 256, 4
    return _finish(ModelConfig(
        vocab_size=vocab_size, hidden_size=D, n_layers=8, n_heads=8, n_kv_heads=4, mlp_hidden_size=768,
        moe=MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=2, expert_hidden_size=256, first_k_dense=1),
        n_streams=M, max_seq_len=1024,
        engram=EngramConfig(
            compressed_vocab_size=compressed_vocab_size or vocab_size, pad_id=pad_id, layer_ids=(1, 4),
            rows_per_head=(rows_per_head,) * 2, max_ngram_size=3, n_head_per_ngram=8,
            n_embed_per_ngram=128),
    ), engram, overrides)


def moe_27b(**overrides) -> ModelConfig:
    """The paper's MoE-27B baseline: 30 blocks of width 2560, 32 heads, mHC with 4 streams,
    1 leading dense block, 2 shared + 72 routed experts (top-6). Attention is GQA here (the
    paper uses MLA); expert width 1536 makes 17 experts x 29 layers pay for the 5.7B table."""
    return _finish(ModelConfig(
        vocab_size=129280, hidden_size=2560, n_layers=30, n_heads=32, n_kv_heads=32, mlp_hidden_size=10240,
        moe=MoEConfig(n_routed_experts=72, n_shared_experts=2, top_k=6, expert_hidden_size=1536, first_k_dense=1),
        n_streams=4, max_seq_len=4096, engram=None,
    ), True, overrides)


def engram_27b(*, compressed_vocab_size: int | None = None, pad_id: int = 2, **overrides) -> ModelConfig:
    """The paper's Engram-27B: MoE-27B with 55 routed experts and Engram at blocks 1 and 14
    (the paper's 1-based layers 2 and 15): N-grams {2, 3}, 8 heads each, 16 tables x 80 dims
    (d_mem 1280), 2,262,400 rows per table. `compressed_vocab_size`: from your tokenizer
    (DeepSeek-V3's compresses 128,815 ids to 98,627); default: the model vocabulary."""
    base = moe_27b()
    return _finish(dataclasses.replace(
        base, moe=dataclasses.replace(base.moe, n_routed_experts=55),
        engram=EngramConfig(
            compressed_vocab_size=compressed_vocab_size or base.vocab_size, pad_id=pad_id, layer_ids=(1, 14),
            rows_per_head=(2_262_400, 2_262_400), max_ngram_size=3, n_head_per_ngram=8,
            n_embed_per_ngram=640),
    ), True, overrides)


PRESETS = {"tiny": tiny, "small": small, "moe_27b": moe_27b, "engram_27b": engram_27b}
