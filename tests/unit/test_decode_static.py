"""The static decode state, the sync-free forward and `generate`'s batched host syncs."""

import pytest
import torch

from engram import generate
from engram.memory import HostTable


def test_state_is_allocated_once_and_updated_in_place(tiny_model, tiny_config):
    model = tiny_model(tiny_config(M=4))
    ids = torch.randint(0, 97, (2, 12))
    state = model.new_state(2, max_len=20)
    fixed = [(t.data_ptr(), t.shape) for t in state.tensors() if not any(t is s.history for s in state.conv.values())]
    assert state.capacity == 20 and all(c.k.shape == (2, 2, 20, 8) for c in state.kv)
    model(ids[:, :7], state)
    for t in range(7, 12):
        model(ids[:, t:t + 1], state)
    now = [(t.data_ptr(), t.shape) for t in state.tensors() if not any(t is s.history for s in state.conv.values())]
    assert now == fixed, "a state buffer was reallocated or reshaped"
    assert int(state.length) == 12 and state.next_position.tolist() == [12, 12]
    assert state.key_valid[:, :12].all() and not state.key_valid[:, 12:].any()
    assert all(c.k[:, :, 12:].abs().sum() == 0 and c.length is state.length for c in state.kv)


def test_tight_capacity_chunks_and_left_padding_equal_the_full_forward(tiny_model, tiny_config):
    model = tiny_model(tiny_config(M=4))
    ids = torch.randint(1, 97, (2, 23))
    full = model(ids).logits
    state, pieces, t = model.new_state(2, max_len=23), [], 0  # exactly full at the end
    for s in (5, 1, 9, 1, 7):
        pieces.append(model(ids[:, t:t + s], state).logits)
        t += s
    err = (torch.cat(pieces, 1) - full).abs().max().item()
    assert err < 1e-4, f"max |chunked - full| = {err}"
    # the host's count dropped midway (a compiled step does that): all C columns from then on
    state, pieces = model.new_state(2, max_len=30), []
    for t, s in ((0, 6), (6, 1), (7, 8), (15, 1), (16, 7)):
        if t == 7:
            state.written = None
        pieces.append(model(ids[:, t:t + s], state).logits)
    err = (torch.cat(pieces, 1) - full).abs().max().item()
    assert err < 1e-4 and state.written is None and int(state.length) == 23, err
    # a left-padded batch, decoded token by token after the prompt, equals each row alone
    long, short = ids[0], ids[1, :14]
    padded = torch.zeros(2, 18, dtype=torch.long)
    padded[0], padded[1, 9:] = long[:18], short[:9]
    valid = padded != 0
    state = model.new_state(2, max_len=23)
    out = [model(padded, state, valid=valid).logits[:, -1:]]
    nxt = torch.stack([long[18:23], short[9:14]])
    for t in range(4):
        out.append(model(nxt[:, t:t + 1], state).logits)
    out = torch.cat(out, 1)
    alone = [model(long[None, :22]).logits[0, 17:], model(short[None, :13]).logits[0, 8:]]
    for b in range(2):
        err = (out[b] - alone[b]).abs().max().item()
        assert err < 1e-4, f"row {b}: max |padded decode - alone| = {err}"


def test_length_limits_are_clear_errors_at_the_boundary(tiny_model, tiny_config):
    model = tiny_model(tiny_config())  # max_seq_len 64
    assert model(torch.randint(0, 97, (1, 64))).logits.shape == (1, 64, 97)
    with pytest.raises(ValueError, match="input longer than max_seq_len: 65 > 64"):
        model(torch.randint(0, 97, (1, 65)))
    with pytest.raises(ValueError, match="input longer than max_seq_len"):
        model.check_inputs(torch.randint(0, 97, (1, 65)))
    with pytest.raises(ValueError, match=r"max_len must be in \[1, max_seq_len=64\]"):
        model.new_state(1, max_len=65)
    state = model.new_state(1, max_len=10)
    with pytest.raises(ValueError, match="capacity: 11 > 10"):
        model(torch.randint(0, 97, (1, 11)), state)
    model(torch.randint(0, 97, (1, 6)), state)
    model.check_inputs(torch.randint(0, 97, (1, 4)), state=state)  # exactly fills it
    model(torch.randint(0, 97, (1, 4)), state)
    with pytest.raises(ValueError, match="longer than the decode state's capacity 10: 10 positions held"):
        model.check_inputs(torch.randint(0, 97, (1, 1)), state=state)
    with pytest.raises(ValueError, match="capacity 10: 10 positions held \\+ 1 given"):
        model(torch.randint(0, 97, (1, 1)), state)  # eager: the host counts the columns
    state.written = None  # as after a compiled step: the count lives on the device only
    with pytest.raises(ValueError, match="longer than the decode state's capacity 10: 10 positions held"):
        model.check_inputs(torch.randint(0, 97, (1, 1)), state=state)
    with pytest.raises(RuntimeError, match="longer than the decode state's capacity"):
        model(torch.randint(0, 97, (1, 1)), state)  # no host sync: an async assert (immediate on a CPU)
    # generate: prompt + max_new_tokens - 1 positions are fed
    assert len(generate(model, [[1] * 60], 5, temperature=0)[0]) == 5
    with pytest.raises(ValueError, match="input longer than max_seq_len=64: 0 positions held \\+ 60 given \\+ 5"):
        generate(model, [[1] * 60], 6, temperature=0)


SYNCS = ("__bool__", "__int__", "__float__", "__index__", "item", "tolist")


def count_syncs(monkeypatch):
    """Count Python-level reads of tensor values (each one a host sync on a GPU)."""
    counts = dict.fromkeys(SYNCS, 0)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


@pytest.mark.parametrize("M", [1, 4])
def test_forward_reads_no_tensor_values(tiny_model, tiny_config, monkeypatch, M):
    """Training forward, padded prefill and decode steps: not one host sync (MoE included)."""
    model = tiny_model(tiny_config(M=M))
    ids = torch.randint(1, 97, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    state = model.new_state(2, max_len=16)
    counts = count_syncs(monkeypatch)
    model.train()
    model(ids).logits.sum().backward()
    model.eval()
    model(ids, state, valid=valid)
    for t in range(3):
        model(ids[:, t:t + 1], state)
    assert sum(counts.values()) == 0, counts


def reference_generate(model, prompts, max_new_tokens, *, eos_id, seed, **sampling):
    """The per-token loop `generate` replaced (one host sync per token), as the oracle."""
    from engram.model.generate import sample_next

    B, S = len(prompts), max(len(p) for p in prompts)
    ids, valid = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):], valid[b, S - len(p):] = torch.tensor(p), True
    generator = torch.Generator().manual_seed(seed)
    state = model.new_state(B)
    logits = model(ids, state, valid=valid).logits[:, -1]
    new, done = [[] for _ in range(B)], torch.zeros(B, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = sample_next(logits, generator=generator, **sampling)
        for b in range(B):
            if not done[b]:
                new[b].append(int(token[b]))
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = model(token.unsqueeze(1), state).logits[:, -1]
    return new


def test_generate_equals_the_per_token_loop_and_syncs_every_k_steps(tiny_model, tiny_config, monkeypatch):
    model = tiny_model(tiny_config(M=4))
    prompts = [[5, 6, 7, 8, 9], [3, 4], [20, 21, 22, 23]]
    sampling = dict(temperature=1.0, top_k=30, top_p=0.95)
    free = reference_generate(model, prompts, 12, eos_id=-1, seed=3, **sampling)
    eos = free[1][4]  # row 1 stops at its 5th token; the others at their first such token, if any
    want = reference_generate(model, prompts, 12, eos_id=eos, seed=3, **sampling)
    assert want[1][-1] == eos and len(want[1]) <= 5
    for k in (1, 3, 8, 100):
        got = generate(model, prompts, 12, eos_id=eos, seed=3, sync_every=k, **sampling)
        assert got == want, f"sync_every={k}"
    assert generate(model, prompts, 12, seed=3, **sampling) == free
    # every row at eos: stops at the first check after that
    greedy = generate(model, [[1, 2, 3]], 10, temperature=0)[0]
    assert generate(model, [[1, 2, 3]], 10, temperature=0, eos_id=greedy[0], sync_every=4) == [[greedy[0]]]
    counts = count_syncs(monkeypatch)
    generate(model, prompts, 20, eos_id=-1, seed=3, sync_every=8, **sampling)
    assert counts["__bool__"] == 20 // 8, counts  # done.all(), every 8 tokens
    assert counts["tolist"] == 1 and counts["item"] == 0, counts  # the tokens, once, at the end
    with pytest.raises(ValueError, match="sync_every >= 1"):
        generate(model, prompts, 4, sync_every=0)


def test_tables_follow_the_rows_device(tiny_model, tiny_config):
    """Offsets and sizes are rebuilt (not copied) on the rows' device, once. On a CPU-only
    machine the table is built with its buffers on "meta" to stand in for another device."""
    model = tiny_model(tiny_config())
    ids = torch.randint(0, 97, (2, 11))
    want = model(ids).logits
    weights = {layer: model.blocks[layer].engram.table.weight.detach() for layer in model.engram_layers}
    table = HostTable(model.blocks[1].engram.table.table_sizes, 8, weights[1], device="meta")
    assert table.offsets.is_meta
    rows = model.hasher.hash(model.compress(ids))[1]
    got = table(rows)
    assert table.offsets.device.type == "cpu" and table.sizes.device.type == "cpu"
    assert torch.equal(table.offsets, model.blocks[1].engram.table.offsets)
    assert torch.equal(got, model.blocks[1].engram.table(rows))
    buffer = table.offsets
    table(rows)
    assert table.offsets is buffer  # moved once, then reused
    # a model serving tables whose buffers sit elsewhere (as a table factory might build them)
    for layer in model.engram_layers:
        sizes = model.blocks[layer].engram.table.table_sizes
        model.set_table(layer, HostTable(sizes, 8, weights[layer], device="meta"))
    assert torch.equal(model(ids).logits, want)
