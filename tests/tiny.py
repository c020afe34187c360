"""The shared tiny model of the unit tests: 3 blocks of width 32, MoE, two Engram layers, any
stream count M; small enough that a test builds several in a second. Use it through the
`tiny_config` / `tiny_model` fixtures (tests/conftest.py) or import it (`from tests.tiny import
build, small_config`)."""

import torch

from engram import EngramLM
from engram.config import EngramConfig, ModelConfig, MoEConfig


def small_config(M=1, engram=True, moe=True, **kw):
    D = 32
    return ModelConfig(
        vocab_size=97, hidden_size=D, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=16, first_k_dense=1)
        if moe else None,
        n_streams=M, max_seq_len=64,
        engram=EngramConfig(compressed_vocab_size=97, pad_id=0, layer_ids=(1, 2), rows_per_head=(101, 103),
                            n_head_per_ngram=2, n_embed_per_ngram=16, conv_zero_init=False,
                            table_init_std=1.0)  # rows that add something: decoding checks Engram's history
        if engram else None, **kw)


def build(config, seed=0):
    torch.manual_seed(seed)
    model = EngramLM(config)
    with torch.no_grad():  # move the hyper-connection maps off their static init
        for name, p in model.named_parameters():
            if name.endswith((".phi", "alpha_pre", "alpha_post", "alpha_res")):
                p.normal_(0, 0.3)
    return model.eval()
