"""EngramLM: exact chunked decoding, causality, padding, residual equivalence, gradients, I/O."""

import dataclasses

import pytest
import torch

from engram import EngramLM, generate, load_model, presets, save_model
from engram.config import EngramConfig, ModelConfig
from tests.tiny import build, small_config


@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("engram", [True, False])
def test_any_chunking_equals_the_full_forward(M, engram):
    model = build(small_config(M=M, engram=engram))
    ids = torch.randint(0, 97, (2, 23))
    full = model(ids).logits
    for trial in range(3):
        sizes, left = [], 23
        while left:
            sizes.append(min(left, int(torch.randint(1, 8, ()))))
            left -= sizes[-1]
        state, pieces, t = model.new_state(2), [], 0
        for s in sizes:
            out = model(ids[:, t:t + s], state)
            pieces.append(out.logits)
            state, t = out.state, t + s
        err = (torch.cat(pieces, 1) - full).abs().max().item()
        assert err < 1e-4, f"chunks {sizes}: max |chunked - full| = {err}"
    # token by token too
    state, pieces = model.new_state(2), []
    for t in range(23):
        out = model(ids[:, t:t + 1], state)
        pieces.append(out.logits)
        state = out.state
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-4


def test_causality():
    model = build(small_config(M=4))
    ids = torch.randint(0, 97, (2, 20))
    ids2 = ids.clone()
    ids2[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(ids).logits, model(ids2).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_left_padding_equals_unpadded():
    model = build(small_config(M=4))
    long, short = torch.randint(1, 97, (1, 15)), torch.randint(1, 97, (1, 9))
    ids = torch.zeros(2, 15, dtype=torch.long)
    ids[0], ids[1, 6:] = long[0], short[0]
    valid = ids != 0
    valid[0] = True
    out = model(ids, valid=valid).logits
    assert (out[0] - model(long).logits[0]).abs().max() < 1e-4
    err = (out[1, 6:] - model(short).logits[0]).abs().max().item()
    assert err < 1e-4, err


def test_batched_generation_equals_one_by_one_greedy():
    model = build(small_config(M=4))
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]
    together = generate(model, prompts, 6, temperature=0)
    alone = [generate(model, [p], 6, temperature=0)[0] for p in prompts]
    assert together == alone
    # and greedy decoding agrees with argmax of the full forward
    seq = prompts[0] + together[0]
    logits = model(torch.tensor([seq])).logits[0]
    assert logits[len(prompts[0]) - 1:-1].argmax(-1).tolist() == together[0]


def test_sampling_is_seeded_and_stops_at_eos():
    model = build(small_config())
    a = generate(model, [[1, 2, 3]], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    b = generate(model, [[1, 2, 3]], 10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert a == b and len(a[0]) == 10
    first = generate(model, [[1, 2, 3]], 10, temperature=0)[0][0]
    assert generate(model, [[1, 2, 3]], 10, temperature=0, eos_id=first) == [[first]]


def test_one_stream_is_the_plain_residual_model():
    model = build(small_config(M=1))
    ids = torch.randint(0, 97, (2, 11))
    rows = model.hasher.hash(model.compress(ids))
    h = model.embed(ids)
    for i, block in enumerate(model.blocks):
        if block.engram is not None:
            h = h + block.engram(h, rows[i])
        h = h + block.attn(block.attn_norm(h), torch.arange(11).expand(2, 11))
        h = h + block.mlp(block.mlp_norm(h))
    assert torch.equal(model.lm_head(model.norm(h)), model(ids).logits)
    assert sum(p.numel() for n, p in model.named_parameters() if ".hc_" in n) == 0


def test_gradients_reach_exactly_the_rows_read():
    model = build(small_config(M=4))
    model.train()
    ids = torch.randint(0, 97, (2, 9))
    out = model(ids, return_intermediates=True)
    out.logits.square().mean().backward()
    for layer in (1, 2):
        table = model.blocks[layer].engram.table
        touched = table.weight.grad.abs().sum(1).nonzero().flatten()
        read = torch.unique(out.intermediates["rows"][layer] + table.offsets)
        assert torch.equal(touched, read)


def test_intermediates_for_analysis():
    model = build(small_config(M=4))
    out = model(torch.randint(0, 97, (2, 7)), return_intermediates=True)
    inter = out.intermediates
    assert len(inter["hidden_states"]) == 3 and inter["hidden_states"][0].shape == (2, 7, 32)
    assert set(inter["gates"]) == {1, 2} and inter["gates"][1].shape == (2, 7, 4)
    assert ((inter["gates"][1] > 0) & (inter["gates"][1] < 1)).all()
    assert inter["rows"][2].shape == (2, 7, 4)


def test_bad_inputs_are_clear_errors():
    model = build(small_config())
    # values are checked once at the boundary (forward has no host syncs)
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model.check_inputs(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        model.check_inputs(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="integer"):
        model.check_inputs(torch.tensor([[1.0, 2.0]]))
    model.check_inputs(torch.tensor([[0, 96]]))  # the whole range is fine
    for check in (model, model.check_inputs):  # shapes: in forward too
        with pytest.raises(ValueError, match="batch, time"):
            check(torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="state holds 2 sequences"):
            check(torch.tensor([[1]]), state=model.new_state(2))
    rows = model.hasher.hash(model.compress(torch.tensor([[1, 2, 3]])))
    model.check_inputs(torch.tensor([[1, 2, 3]]), rows=rows)
    rows[2] = rows[2].clone()
    rows[2][0, 1, 3] = model.blocks[2].engram.table.table_sizes[3]
    with pytest.raises(ValueError, match="out of range for hash table 3"):
        model.check_inputs(torch.tensor([[1, 2, 3]]), rows=rows)
    with pytest.raises(ValueError, match="compression table"):
        EngramLM(small_config(), compression=torch.arange(50).numpy())


def test_save_load_round_trip(tmp_path):
    for config in (small_config(M=4), small_config(engram=False, tie_embeddings=True)):
        model = build(config)
        with torch.no_grad():
            for m in model.moe_layers():
                m.router_bias.normal_()
        save_model(model, tmp_path / "m")
        assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
            ["config.json", "model.safetensors"] + (["hash_layout.json"] if config.engram else []))
        again = load_model(tmp_path / "m").eval()
        ids = torch.randint(0, 97, (2, 10))
        assert torch.equal(again(ids).logits, model(ids).logits)
        assert again.config == model.config


def test_load_rejects_a_mismatched_layout(tmp_path):
    model = build(small_config())
    save_model(model, tmp_path / "m")
    other = EngramLM(dataclasses.replace(small_config(), engram=dataclasses.replace(
        small_config().engram, seed=5)))
    other.layout.save(tmp_path / "m" / "hash_layout.json")
    with pytest.raises(ValueError, match="hash layout mismatch.*seed"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="hash layout mismatch|truncated"):
        load_model(tmp_path / "m")


def test_meta_construction_and_init_weights():
    model = EngramLM(presets.tiny(), device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.compression, torch.arange(8192))
    conv = model.blocks[1].engram.short_conv.weight
    assert torch.count_nonzero(conv) == 0
    std = model.blocks[2].attn.wq.weight.std().item()
    assert 0.015 < std < 0.025
    assert torch.isfinite(model(torch.randint(0, 8192, (1, 16))).logits).all()


def test_param_groups_cover_every_parameter_once():
    model = EngramLM(small_config(M=4, tie_embeddings=True))
    groups = {g["name"]: g for g in model.param_groups(lr=1e-3)}
    assert groups["engram_tables"]["lr"] == pytest.approx(5e-3) and groups["engram_tables"]["weight_decay"] == 0
    assert len(groups["engram_tables"]["params"]) == 2
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())


def test_router_bias_updates_from_the_model():
    model = build(small_config(M=4)).train()
    with torch.no_grad():
        model(torch.randint(0, 97, (4, 16)))
    moe = model.moe_layers()
    assert len(moe) == 2 and all(m.expert_load.sum() == 4 * 16 * 2 for m in moe)
    loads = [m.expert_load.clone() for m in moe]
    expected = max(((l.max() - l.mean()) / l.mean()).item() for l in loads)
    stats = model.update_router_biases()
    assert stats["max_violation"] == pytest.approx(expected)
    assert all(m.expert_load.sum() == 0 and m.router_bias.abs().sum() > 0 for m in moe)


def test_models_can_be_deep_copied():
    import copy

    model = build(small_config(M=4))
    clone = copy.deepcopy(model)
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(clone(ids).logits, model(ids).logits)
    assert clone.blocks[1].engram.table._gather_lock is not model.blocks[1].engram.table._gather_lock


def test_engram_starts_at_the_residual_streams_scale():
    """A fresh Engram layer must not drown the stream it is added to (init_weights): with
    N(0, 1) rows it adds at the stream's scale; with zero rows (the default) it adds nothing."""
    for table_init_std in (1.0, 0.0):
        torch.manual_seed(0)
        config = presets.tiny()
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=table_init_std))
        model = EngramLM(config).eval()
        ids = torch.randint(0, 8192, (2, 64))
        h = model.embed(ids)
        out = model.blocks[1].engram(h, model.hasher.hash(model.compress(ids))[1])
        ratio = (out.pow(2).mean().sqrt() / h.pow(2).mean().sqrt()).item()
        assert 0.1 < ratio < 2.0 if table_init_std else ratio == 0.0, ratio


def test_init_weights_draws_each_table_once_and_keeps_the_engram_projection_init(monkeypatch):
    """Tables are the model's biggest tensors: one draw each. The projection keeps Engram's own
    residual-scale init (nn.Linear's reset must not run after it)."""
    from engram.memory import InMemoryTable

    calls = []
    original = InMemoryTable.reset_parameters
    monkeypatch.setattr(InMemoryTable, "reset_parameters", lambda self: (calls.append(self), original(self)))
    config = presets.tiny()
    model = EngramLM(config, device="meta").to_empty(device="cpu")
    calls.clear()  # the constructor's draws on the meta device cost nothing
    model.init_weights()
    assert len(calls) == len(model.engram_layers) == 1
    proj = model.blocks[1].engram.proj.weight
    expected = 0.02 / config.engram.memory_dim ** 0.5
    assert abs(proj.std().item() / expected - 1) < 0.05, (proj.std().item(), expected)


def test_single_row_reads_one_row_per_head_and_counts_it():
    """The capacity-1 control: every n-gram of a head reads the same row, for any input."""
    from engram.model.accounting import count_params, param_counts

    V, D = 97, 32
    config = ModelConfig(vocab_size=V, hidden_size=D, n_layers=2, n_heads=4, mlp_hidden_size=48, max_seq_len=32,
                         engram=EngramConfig(compressed_vocab_size=V, pad_id=0, layer_ids=(1,),
                                             rows_per_head=(101, 103), n_head_per_ngram=2,
                                             n_embed_per_ngram=16, single_row=True))
    torch.manual_seed(0)
    model = EngramLM(config).eval()
    table = model.blocks[1].engram.table
    assert table.table_sizes == (1, 1, 1, 1)
    assert count_params(config) == param_counts(model)
    assert count_params(config)["engram_tables_params"] == 4 * 8
    seen = []
    table.register_forward_hook(lambda m, a, out: seen.append(out))
    ids = torch.randint(0, V, (2, 12))
    out = model(ids, return_intermediates=True)
    assert all(int(r.abs().max()) == 0 for r in out.intermediates["rows"].values())
    rows = seen[0]  # [B, T, H, E]: the same memory vector at every position of every sequence
    assert torch.equal(rows, rows[:1, :1].expand_as(rows))
    # decoding one token at a time reads the same single row
    state = model.new_state(2)
    step = torch.cat([model(ids[:, t:t + 1], state=state).logits for t in range(12)], dim=1)
    torch.testing.assert_close(step, out.logits, atol=1e-4, rtol=1e-4)


def test_rope_is_bit_identical_to_the_half_rotation_formula():
    from engram.model.rope import apply_rope, rope_angles

    positions = torch.randint(0, 5000, (3, 7))
    x = torch.randn(3, 4, 7, 16)
    inv_freq = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    angles = (positions.float().unsqueeze(-1) * inv_freq).unsqueeze(1)  # [B, 1, S, 8]
    x1, x2 = x.chunk(2, dim=-1)
    want = torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)
    assert torch.equal(apply_rope(x, *rope_angles(positions, 16, 10000.0)), want)
    assert apply_rope(x.bfloat16(), *rope_angles(positions, 16, 10000.0)).dtype == torch.bfloat16


def test_document_boundary_resets_hold_in_chunked_decoding():
    """engram.reset_id: n-grams stop at a boundary id (packed documents); chunked decoding still
    equals the full forward, and the rows after a boundary no longer see the ids before it."""
    import dataclasses

    config = small_config(M=1)
    reset = dataclasses.replace(config, engram=dataclasses.replace(config.engram, reset_id=5))
    model = build(reset)
    ids = torch.randint(6, 97, (2, 15))
    ids[0, 4] = ids[1, 9] = 5
    full = model(ids).logits
    state, pieces = model.new_state(2), []
    for t in range(0, 15, 4):
        pieces.append(model(ids[:, t:t + 4], state).logits)
    assert (torch.cat(pieces, 1) - full).abs().max().item() < 1e-4
    rows = model.hasher.hash(model.compress(ids))[1]
    plain = build(config).hasher.hash(model.compress(ids))[1]
    assert torch.equal(rows[0, :5], plain[0, :5]) and not torch.equal(rows[0, 5:7], plain[0, 5:7])
    after = ids.clone()
    after[0, :4] = torch.randint(6, 97, (4,))  # the first document changes: rows after the boundary do not
    assert torch.equal(model.hasher.hash(model.compress(after))[1][0, 5:], rows[0, 5:])
