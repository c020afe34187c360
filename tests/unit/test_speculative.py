"""DecodeState.rollback (KV cache, n-gram history, conv history) against the straight path, and
prompt-lookup speculative decoding against plain greedy decoding."""

import dataclasses

import pytest
import torch

from engram import presets
from engram.model import EngramLM, generate, prompt_lookup, speculative_generate


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = presets.tiny(vocab_size=96, n_streams=2)
    config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=1.0))
    m = EngramLM(config).eval()  # N(0, 1) rows: the n-gram history changes the logits
    with torch.no_grad():  # the conv starts at zero: give it weights, or its history would not matter
        m.blocks[1].engram.short_conv.weight.normal_(0, 0.5)
    return m


def ids(*values):
    return torch.tensor([list(values)])


def decode(model, state, *chunks):
    return [model(ids(*c), state).logits for c in chunks]


def same_state(a, b):
    assert a.written == b.written and torch.equal(a.next_position, b.next_position)
    assert torch.equal(a.ngram_history, b.ngram_history)
    for layer in a.conv:
        torch.testing.assert_close(a.conv[layer].history, b.conv[layer].history, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk, drop", [((7, 8, 9, 10, 11), 3), ((7,), 1), ((7, 8, 9), 0), ((7, 8), 2)])
def test_decode_rollback_decode_equals_the_straight_path(model, chunk, drop):
    with torch.no_grad():
        spec = model.new_state(1, max_len=40).track_rollback()
        decode(model, spec, (1, 2, 3, 4, 5, 6), chunk)
        spec.rollback(drop)
        straight = model.new_state(1, max_len=40)
        decode(model, straight, (1, 2, 3, 4, 5, 6), *([chunk[:len(chunk) - drop]] if len(chunk) > drop else []))
        same_state(spec, straight)
        a, b = decode(model, spec, (20, 21, 22))[0], decode(model, straight, (20, 21, 22))[0]
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        full = model(ids(1, 2, 3, 4, 5, 6, *chunk[:len(chunk) - drop], 20, 21, 22)).logits[:, -3:]
        torch.testing.assert_close(a, full, rtol=1e-4, atol=1e-4)  # and both equal one full forward


def test_per_sequence_rollback_leaves_masked_holes_and_matches_each_row_alone(model):
    with torch.no_grad():
        spec = model.new_state(2, max_len=40).track_rollback()
        model(torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), spec)
        model(torch.tensor([[9, 10, 11, 12], [13, 14, 15, 16]]), spec)
        spec.rollback(torch.tensor([1, 3]))  # keep 3 and 1 of the last 4 tokens
        assert spec.written == 7 and spec.padded  # the shared drop (1) is given back; row 2 has holes
        out = model(torch.tensor([[30, 31], [32, 33]]), spec).logits
        for b, kept in enumerate(([1, 2, 3, 4, 9, 10, 11, 30, 31], [5, 6, 7, 8, 13, 32, 33])):
            alone = model(torch.tensor([kept])).logits[0, -2:]
            torch.testing.assert_close(out[b], alone, rtol=1e-4, atol=1e-4)


def test_rollback_refuses_what_it_cannot_undo(model):
    with torch.no_grad():
        state = model.new_state(1, max_len=20)
        model(ids(1, 2, 3), state)
        with pytest.raises(ValueError, match="track_rollback"):
            state.rollback(1)
        state.track_rollback()
        model(ids(4, 5), state)
        with pytest.raises(ValueError, match="can drop 0..2"):
            state.rollback(3)
        state.rollback(1)
        with pytest.raises(ValueError, match="rolled back already"):
            state.rollback(1)


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    assert prompt_lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]
    assert prompt_lookup([4, 5, 6, 4], 3) == [5, 6, 4]  # a 1-gram match when no longer one recurs
    assert prompt_lookup([1, 2, 3], 4) == []


def test_speculative_greedy_equals_plain_greedy_and_accepts_drafts(model):
    prompts = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 13, 11, 12, 13, 11], [40, 41]]
    plain = generate(model, prompts, 24, temperature=0)
    spec, stats = speculative_generate(model, prompts, 24, draft_tokens=4)
    assert spec == plain
    assert stats["new_tokens"] == sum(len(p) for p in plain)
    assert stats["accepted"] > 0 and stats["forwards"] < stats["new_tokens"] + len(prompts)
    assert generate(model, prompts, 24, temperature=0, draft="prompt_lookup") == plain
    eos = plain[0][5]
    assert speculative_generate(model, prompts[:1], 24, eos_id=eos)[0] == generate(model, prompts[:1], 24,
                                                                                     temperature=0, eos_id=eos)
    with pytest.raises(ValueError, match="temperature=0"):
        generate(model, prompts, 4, temperature=1.0, draft="prompt_lookup")
