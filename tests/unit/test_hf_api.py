"""The rest of the transformers model API on EngramForCausalLM, each against engram itself or
against the same model without the feature: assisted and prompt-lookup decoding equal greedy,
`crop` is exact, hidden states, return_dict=False, gradient checkpointing, resizing the
vocabulary, the context-length stop, the default use_cache."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram.hf import EngramCache, EngramForCausalLM, EngramLMConfig  # noqa: E402
from tests.tiny import build, small_config  # noqa: E402

pytestmark = pytest.mark.hf


def hf_model(M=2, moe=True, seed=0):
    return EngramForCausalLM.from_engram(build(small_config(M=M, moe=moe), seed=seed)).eval()


def repetitive_prompt(seed=1):
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:, :6]], 1)  # a repeat, so prompt lookup finds candidates


def test_config_declares_use_cache_and_a_plain_call_works():
    assert EngramLMConfig().use_cache is True and EngramLMConfig(use_cache=False).use_cache is False
    hf = hf_model()
    out = hf(repetitive_prompt())
    assert isinstance(out.cache, EngramCache) and out.cache.get_seq_length() == 18


@pytest.mark.parametrize("M", [1, 2])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(M, monkeypatch):
    hf, ids = hf_model(M), repetitive_prompt()
    drops = []
    crop = EngramCache.crop

    def counting(self, n):
        drops.append((id(self), self.get_seq_length(), n))
        crop(self, n)

    monkeypatch.setattr(EngramCache, "crop", counting)
    greedy = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert not drops
    lookup = hf.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, greedy)
    assert any(n < 0 for _, _, n in drops)  # some candidates were rejected and rolled back
    drops.clear()
    assistant = hf_model(M, seed=3)  # another model: most of its drafts are wrong
    assistant.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)  # drafts of 4, fed one by one
    assisted = hf.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy)
    assert min(n for _, _, n in drops) < -1  # the assistant's cache dropped tokens fed by several forwards


def test_crop_returns_exactly_into_earlier_forwards():
    hf, ids = hf_model(), repetitive_prompt()
    more = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = EngramCache()
        cache.activate_past_recording()
        hf(ids, cache=cache)
        hf(more[:, :2], cache=cache)  # a forward of 2, then 4 of one token each
        for j in range(2, 6):
            hf(more[:, j:j + 1], cache=cache)
        cache.crop(-5)  # back into the forward of 2: keeps more[:, :1]
        assert cache.get_seq_length() == 19
        after = hf(more[:, 3:5], cache=cache).logits
        fresh = hf(torch.cat([ids, more[:, :1], more[:, 3:5]], 1), use_cache=False).logits[:, -2:]
    torch.testing.assert_close(after, fresh, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="only tokens fed since past recording began"):
        cache.crop(-100)


def test_hidden_states_return_dict_and_attentions():
    hf, ids = hf_model(), repetitive_prompt()
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, use_cache=False)
        inner = hf.model(ids, return_intermediates=True)
    states = inner.intermediates["hidden_states"]
    assert len(out.hidden_states) == hf.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], hf.model.embed(ids))
    for mine, theirs in zip(out.hidden_states[1:-1], states[:-1]):
        assert torch.equal(mine, theirs)
    assert torch.equal(hf.model.lm_head(out.hidden_states[-1]), out.logits)
    labels = ids.clone()
    as_tuple = hf(ids, labels=labels, use_cache=False, return_dict=False)
    as_dict = hf(ids, labels=labels, use_cache=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.loss)
    assert torch.equal(as_tuple[1], as_dict.logits)
    with pytest.raises(ValueError, match="output_attentions is not available"):
        hf(ids, output_attentions=True)


def test_gradient_checkpointing_gives_the_same_gradients():
    hf, ids = hf_model(moe=False), repetitive_prompt()
    hf.train()

    def grads():
        hf.zero_grad()
        hf(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}

    plain = grads()
    hf.activation_checkpointing_enable()
    assert hf.is_activation_checkpointing and all(b.gradient_checkpointing for b in hf.model.blocks)
    checkpointed = grads()
    hf.activation_checkpointing_disable()
    assert not hf.is_activation_checkpointing and not any(b.gradient_checkpointing for b in hf.model.blocks)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_resize_token_embeddings_grows_the_compression_table(tmp_path):
    hf, ids = hf_model(), repetitive_prompt()
    with torch.no_grad():
        before = hf(ids, use_cache=False).logits
    hf.resize_token_embeddings(105)
    assert hf.config.vocab_size == 105 and hf.model.config.vocab_size == 105
    assert hf.model.compression[97:].tolist() == list(range(97, 105))  # new ids are their own compressed ids
    assert hf.model.compression[:97].tolist() == list(range(97))
    new = torch.tensor([[5, 100, 103, 7, 100]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids, use_cache=False).logits[..., :97], before, rtol=0, atol=1e-6)
        rows = hf.model.hasher.hash(hf.model.compress(new), check=False)
        assert all(int(r.max()) < sum(hf.model.blocks[layer].engram.table.table_sizes) for layer, r in rows.items())
        hf.save_pretrained(tmp_path)
        again = EngramForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(new, use_cache=False).logits, hf(new, use_cache=False).logits)
    assert torch.equal(again.model.compression, hf.model.compression)


def test_generation_stops_at_the_context_length_and_at_eos():
    hf, ids = hf_model(), repetitive_prompt()
    out = hf.generate(ids, max_new_tokens=200, do_sample=False)
    assert out.shape[1] == hf.model.config.max_seq_len
    greedy = hf.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = greedy[3]
    stopped = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert stopped[0, ids.shape[1]:].tolist() == greedy[:greedy.index(eos) + 1]


def test_a_model_built_on_meta_gets_its_compression_table_from_init_weights():
    from engram import EngramLM

    config = small_config()
    table = np.arange(97) % 61
    ref = EngramLM(config.__class__(**{**config.__dict__, "engram": config.engram.__class__(
        **{**config.engram.__dict__, "compressed_vocab_size": 61})}), compression=table)
    with torch.device("meta"):
        meta = EngramForCausalLM.from_engram(ref).model.__class__(ref.config, compression=table)
    meta.to_empty(device="cpu")
    wrapper = EngramForCausalLM.from_engram(meta)
    wrapper._init_weights(meta)
    assert torch.equal(meta.compression, torch.from_numpy(table))


def test_init_weights_follows_engram_and_keeps_what_a_checkpoint_holds(tmp_path):
    """A model built from a config gets EngramLM's initialization (per-tensor scale), and a
    checkpoint that lacks some weights (here the short convs) loads the rest untouched: the
    Engram tables keep their trained rows instead of being re-drawn at their init scale."""
    from safetensors.torch import load_file, save_file

    from engram import EngramLM

    config = small_config(M=2)
    ours = EngramLM(config)
    built = EngramForCausalLM(EngramLMConfig(engram_model=config.to_dict()))
    for (name, a), (_, b) in zip(ours.state_dict().items(), built.model.state_dict().items()):
        if not a.is_floating_point() or a.numel() < 2 or a.std() == 0:  # constant inits and buffers: equal
            assert torch.equal(a, b), name
        else:  # random inits: the same scale
            assert 0.7 < float(b.std() / a.std()) < 1.4, name
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "short_conv.weight" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    again = EngramForCausalLM.from_pretrained(tmp_path)
    for name, value in weights.items():
        if "short_conv.weight" not in name:
            assert torch.equal(again.state_dict()[name], value), name
    conv = again.model.blocks[1].engram.short_conv.weight
    assert not torch.equal(conv, weights["model.blocks.1.engram.short_conv.weight"])


def test_torch_export_of_the_forward_with_dynamic_batch_and_length():
    """torch.export (non-strict) of the cache-free forward: batch and sequence length dynamic
    (lengths from 3 up to the context; a guard specializes below that), outputs bit-equal to
    eager on shapes other than the traced one."""
    hf = hf_model(M=2)

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(ids, use_cache=False).logits

    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    batch, length = torch.export.Dim("batch", max=8), torch.export.Dim("length", min=3, max=64)
    program = torch.export.export(Logits(hf), (ids,), dynamic_shapes={"ids": {0: batch, 1: length}}, strict=False)
    with torch.no_grad():
        for shape in ((2, 9), (3, 17), (1, 3), (5, 64)):
            x = torch.randint(1, 97, shape, generator=torch.Generator().manual_seed(sum(shape)))
            assert torch.equal(program.module()(x), hf(x, use_cache=False).logits), shape
