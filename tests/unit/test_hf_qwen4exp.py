"""transformers' own Qwen4Exp n-gram memory against ours: row ids (packed sequences with EOS,
chunked decoding), the PLE layer's output, and a whole Qwen4Exp model decoding with its own cache."""

import pytest
import torch

pytest.importorskip("transformers")
qwen = pytest.importorskip("transformers.models.qwen4_exp.modeling_qwen4_exp")

from engram.hf import from_qwen4exp, to_qwen4exp  # noqa: E402
from engram.memory.engram import ShortConvState  # noqa: E402

pytestmark = pytest.mark.hf  # transformers integration: deselect with -m 'not hf'

EOS, V = 7, 101


def text_config():
    from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig

    return Qwen4ExpTextConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=4, hc_count=2, hc_lowrank=4, ple_layer_ids=[1, 3],
        ple_embed_dim=32, heads_per_ngram=2, ngram_size=3, ngram_vocab_size_base=211, eos_token_id=EOS, seed=1234,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_expert_intermediate_size=8, linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=8, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=8,
        indexer_budget=8, indexer_compress_ratio=2)


def perturb(module):
    """Norms away from their zero init (stored as 1 + w) and a conv that is not zero (the model's
    init zeroes it), so a wrong norm mapping or a lost conv history shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "conv1d" in name:
                p.normal_(0, 0.3)
    return module


def ple_layers():
    cfg = text_config()
    torch.manual_seed(0)
    return perturb(torch.nn.ModuleList([qwen.Qwen4ExpTextPLELayer(cfg, layer_idx=l, ple_layer_index=i)
                                              for i, l in enumerate(cfg.ple_layer_ids)]))


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


def test_the_layout_records_the_table_padding():
    layers = ple_layers()
    memory = from_qwen4exp(layers)
    assert memory.layout.row_multiple == 128
    for ple in layers:
        rows = ple.ple_embedding.ngram_embedding.weight.shape[0]
        assert memory.layout.stored_rows(ple.layer_idx) == rows > ple.ple_embedding.total_vocab_size
    with pytest.raises(ValueError, match="make_ngram_vocab_size_divisible_by"):
        from_qwen4exp(layers, row_multiple=7)  # 7 cannot give the 128-padded size (7 does not divide it)
    from engram.hashing.layout import HashLayout

    assert HashLayout.from_dict(memory.layout.to_dict()) == memory.layout


def record_ple_calls(model):
    """Per PLE layer, each call's hidden states, n-gram row ids (with head offsets) and output."""
    calls, handles = {}, []
    for ple in (m for m in model.modules() if isinstance(m, qwen.Qwen4ExpTextPLELayer)):
        log = calls.setdefault(ple.layer_idx, [])
        handles.append(ple.ple_embedding.ngram_embedding.register_forward_pre_hook(
            lambda m, args, log=log: log.append({"rows": args[0].clone()})))
        handles.append(ple.register_forward_hook(
            lambda m, args, out, log=log: log[-1].update(hidden=args[0].clone(), out=out.clone())))
    return calls, handles


def test_a_whole_qwen4exp_model_decoding_with_its_cache_matches_our_memory_step_by_step():
    """transformers' own model and cache classes: prefill, then single tokens and chunks through
    its DynamicCache (n-gram ids kept in conv state 2, conv history in state 1). At every call our
    hasher (history carried) gives its row ids, and our Engram (conv state carried) its PLE output."""
    cfg = text_config()
    torch.manual_seed(0)
    model = perturb(qwen.Qwen4ExpForCausalLM(cfg)).eval()
    memory = from_qwen4exp(model)
    assert sorted(memory.engrams) == [0, 2]  # one-indexed ple_layer_ids [1, 3] are decoder layers 0 and 2
    ids = packed_ids()
    B, M, D = ids.shape[0], cfg.hc_count, cfg.hidden_size
    calls, handles = record_ple_calls(model)
    pieces = (5, 1, 1, 7, 1, 6)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, logits, t = None, [], 0
        for n in pieces:
            out = model(ids[:, t:t + n], cache=cache, use_cache=True)
            cache, t = out.cache, t + n
            logits.append(out.logits)
    for h in handles:
        h.remove()
    assert type(cache).__name__ == "DynamicCache"
    assert torch.allclose(torch.cat(logits, 1), full, atol=1e-5)  # their cached path is the one we follow

    history, conv = memory.hasher.initial_history(B), {l: ShortConvState() for l in memory.engrams}
    t = 0
    for i, n in enumerate(pieces):
        rows, history = memory.hasher.hash_step(history, ids[:, t:t + n])
        t += n
        for layer, engram in memory.engrams.items():
            theirs = calls[layer][1 + i]  # call 0 is the uncached full forward
            offsets = torch.tensor(model.model.layers[layer].ple.ple_embedding.head_offsets)
            assert torch.equal(rows[layer] + offsets, theirs["rows"]), (layer, i)
            with torch.no_grad():
                ours = engram(theirs["hidden"].view(B, n, M, D), rows[layer], conv_state=conv[layer]).flatten(-2)
            err = (ours - theirs["out"]).abs().max().item()
            assert err < 1e-5, f"layer {layer}, call {i}: {err}"
    # and the uncached full forward's rows are our whole-sequence hash
    whole = memory.hasher.hash(ids)
    for layer in memory.engrams:
        offsets = torch.tensor(model.model.layers[layer].ple.ple_embedding.head_offsets)
        assert torch.equal(whole[layer] + offsets, calls[layer][0]["rows"])


def test_an_edited_memory_written_back_changes_the_model_as_it_changes_ours():
    layers = ple_layers()
    memory = from_qwen4exp(layers)
    ids = packed_ids()
    rows = memory.hasher.hash(ids)
    hidden = torch.randn(3, 21, 2 * 16)
    padding = [ple.ple_embedding.ngram_embedding.weight[ple.ple_embedding.total_vocab_size:].clone() for ple in layers]
    with torch.no_grad():  # an edit with our objects: zero the rows the first sequence reads, scale a projection
        for layer, engram in memory.engrams.items():
            engram.table.weight[(rows[layer][0] + engram.table.offsets).flatten().unique()] = 0
            engram.proj.weight.mul_(1.5)
    to_qwen4exp(memory, layers)
    again = from_qwen4exp(layers)
    for ple, pad in zip(layers, padding):
        mine, back = memory.engrams[ple.layer_idx], again.engrams[ple.layer_idx]
        for (name, a), (_, b) in zip(mine.state_dict().items(), back.state_dict().items()):
            assert torch.allclose(a.float(), b.float(), atol=1e-6), name  # norms go through 1 + w
        assert torch.equal(ple.ple_embedding.ngram_embedding.weight[ple.ple_embedding.total_vocab_size:], pad)
        with torch.no_grad():
            theirs = ple(hidden, ids, None)
            ours = mine(hidden.view(3, 21, 2, 16), rows[ple.layer_idx]).flatten(-2)
        assert (ours - theirs).abs().max().item() < 1e-5
    other = ple_layers()[:1]
    with pytest.raises(ValueError, match="layout"):
        to_qwen4exp(memory, other)  # a memory read from two layers does not fit a one-layer model
