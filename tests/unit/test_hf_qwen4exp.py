"""transformers' own Qwen4Exp n-gram memory against ours: row ids (packed sequences with EOS,
chunked decoding) and the PLE layer's output."""

import pytest
import torch

pytest.importorskip("transformers")
qwen = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")

from engram.hf.qwen4exp import from_qwen4exp  # noqa: E402

EOS, V = 7, 101


def ple_layers():
    from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig

    cfg = Qwen4ExpTextConfig(vocab_size=V, hidden_size=16, num_hidden_layers=4, hc_count=2, ple_layer_ids=[1, 3],
                             ple_embed_dim=32, heads_per_ngram=2, ngram_size=3, ngram_vocab_size_base=211,
                             eos_token_id=EOS, seed=1234, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                             shared_expert_intermediate_size=8, linear_num_key_heads=2, linear_num_value_heads=2,
                             linear_key_head_dim=8, linear_value_head_dim=8)
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([qwen.Qwen4ExpTextPLELayer(cfg, layer_idx=l, ple_layer_index=i)
                                  for i, l in enumerate(cfg.ple_layer_ids)])
    with torch.no_grad():  # norms away from their zero init (1 + w), a conv that matters
        for name, p in layers.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return layers


def packed_ids():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(8, V, (3, 21), generator=g)
    ids[0, 5] = ids[0, 6] = ids[1, 12] = ids[2, 0] = EOS  # documents end inside the rows (twice in a row too)
    return ids


def their_rows(ple, ids):
    seen = {}
    emb = ple.ple_embedding.ngram_embedding
    handle = emb.register_forward_pre_hook(lambda m, args: seen.setdefault("ids", args[0].clone()))
    ple.ple_embedding(ids, None)
    handle.remove()
    return seen["ids"]


def test_row_ids_equal_qwen4exps_for_packed_sequences_and_chunked_decoding():
    layers = ple_layers()
    memory = from_qwen4exp(layers)
    ids = packed_ids()
    ours = memory.hasher.hash(ids)
    for ple in layers:
        offsets = torch.tensor(ple.ple_embedding.head_offsets)
        theirs = their_rows(ple, ids)
        assert torch.equal(ours[ple.layer_idx] + offsets, theirs), ple.layer_idx
    # chunked decoding (the history carried between calls) gives the same rows
    history, pieces, t = memory.hasher.initial_history(3), [], 0
    for n in (4, 1, 1, 7, 1, 7):
        rows, history = memory.hasher.hash_step(history, ids[:, t:t + n])
        pieces.append(rows[3])
        t += n
    assert torch.equal(torch.cat(pieces, 1), ours[3])
    # without the EOS reset the rows differ: the reset is what makes them equal
    import dataclasses

    from engram.hashing.ngram import NgramHasher

    plain = NgramHasher.from_layout(dataclasses.replace(memory.layout, reset_id=None)).hash(ids)
    assert not torch.equal(plain[3], ours[3])


def test_engram_with_its_weights_matches_the_ple_layer():
    layers = ple_layers()
    memory = from_qwen4exp(layers)
    ids = packed_ids()
    rows = memory.hasher.hash(ids)
    hidden = torch.randn(3, 21, 2 * 16)
    for ple in layers:
        with torch.no_grad():
            theirs = ple(hidden, ids, None)
            ours = memory.engrams[ple.layer_idx](hidden.view(3, 21, 2, 16), rows[ple.layer_idx]).flatten(-2)
        err = (ours - theirs).abs().max().item()
        assert err < 1e-5, f"layer {ple.layer_idx}: {err}"


def test_a_model_without_the_memory_is_a_clear_error():
    with pytest.raises(ValueError, match="no Qwen4Exp n-gram memory"):
        from_qwen4exp(torch.nn.Linear(2, 2))
