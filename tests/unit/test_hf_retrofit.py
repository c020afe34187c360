"""Engram retrofitted into tiny random transformers models: starts bit-identical, decodes with
the cache exactly as without it, comes off cleanly, trains alone, saves and loads."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram.hf import add_engram, engram_param_groups, load_engram_adapter, remove_engram, save_engram_adapter  # noqa: E402

pytestmark = pytest.mark.hf  # transformers integration: deselect with -m 'not hf'

V = 97


def tiny(arch: str):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                          pad_token_id=0)).eval()
    cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
           "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    return cls[1](cls[0](**common)).eval()


def wake(model):
    """Random value projections and conv (a trained adapter): Engram now changes the outputs."""
    with torch.no_grad():
        for name, p in model.engram_adapter.named_parameters():
            if "proj" in name or "short_conv.weight" in name:
                p.normal_(0, 0.5)


def ids(n, seed, batch=1):
    return torch.randint(1, V, (batch, n), generator=torch.Generator().manual_seed(seed))


ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_starts_bit_identical_and_comes_off_cleanly(arch):
    model = tiny(arch)
    x = ids(11, 1)
    with torch.no_grad():
        base = model(x).logits
        add_engram(model, layers=[0, 2], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
        assert torch.equal(model(x).logits, base)  # zero value projection: exactly the base model
        wake(model)
        assert not torch.equal(model(x).logits, base)
        remove_engram(model)
        assert torch.equal(model(x).logits, base)
    assert not hasattr(model, "engram_adapter") and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_decoding_continues_the_ngrams_and_the_conv_unlike_hashing_each_call(arch):
    """TinyEngram's bug, tested by name: hashing only the ids of the current call sees
    (pad, pad, t) at every decoding step and restarts the conv from zeros. Here the cache
    carries both, so cached greedy decoding equals the uncached one, and every step's logits
    equal the full forward's."""
    model = tiny(arch)
    add_engram(model, layers=[1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
    wake(model)
    x = ids(7, 2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(x, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(x, use_cache=False, **kw))
    with torch.no_grad():
        full = model(cached).logits
        out = model(cached[:, :7], use_cache=True)
        cache, steps = out.cache, []
        for t in range(7, cached.shape[1]):
            out = model(cached[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
        err = (torch.cat(steps, 1) - full[:, 7:]).abs().max().item()
        assert err < 1e-5, err
        # the bug itself: a fresh Engram history at each step gives other logits
        from engram.hf.retrofit import EngramCacheLayer

        for layer in cache.layers:
            if isinstance(layer, EngramCacheLayer):
                layer.reset()
        wrong = model(cached[:, -1:], cache=cache, use_cache=True).logits
        assert (wrong - full[:, -1:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_beam_search_and_left_padding_equal_without_the_cache(arch):
    model = tiny(arch)
    add_engram(model, layers=[0, 1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
    wake(model)
    x = ids(6, 3)
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))
    short, long = ids(4, 4), ids(8, 5)
    batch = torch.zeros(2, 8, dtype=torch.long)
    batch[0, 4:], batch[1] = short[0], long[0]
    mask = (torch.arange(8) >= torch.tensor([[4], [0]])).long()
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, single in enumerate((short, long)):
        alone = model.generate(single, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert together[row, 8:].tolist() == alone[0, single.shape[1]:].tolist()


def test_adapter_mode_trains_only_engram_and_the_adapter_round_trips(tmp_path):
    model = tiny("llama")
    base_before = {n: p.clone() for n, p in model.named_parameters()}
    add_engram(model, layers=[1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("engram_adapter.") for n in trainable)
    groups = engram_param_groups(model, lr=1e-2)
    assert groups[1]["lr"] == 5e-2 and groups[1]["weight_decay"] == 0.0  # tables: the paper's recipe
    opt = torch.optim.AdamW(groups)
    x = ids(16, 6, batch=2)
    model.train()
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n]), n
    assert model.engram_adapter.engrams["1"].proj.weight.abs().sum() > 0  # Engram learned
    save_engram_adapter(model, tmp_path / "adapter")
    other = tiny("llama")
    load_engram_adapter(other, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(other(x).logits, model(x).logits)


def test_unsupported_models_and_embeddings_without_ids_are_clear_errors():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="supports decoder-only causal LMs"):
        add_engram(t5, layers=[0])
    model = tiny("llama")
    add_engram(model, layers=[0], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
    with pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(ValueError, match="already has Engram"):
        add_engram(model, layers=[1])


def test_the_retrofit_starts_identical_with_random_or_zero_rows_and_loads_old_adapters(tmp_path):
    """Either the value projection or the rows start at zero, never both (neither would get a
    gradient): N(0, 1) rows with a zero projection by default; zero rows with the projection
    at its init. An adapter saved before the renames (vocab_size_per_ngram, the width and
    streams inside its config) loads the same."""
    import json

    from engram import EngramConfig

    model = tiny("llama")
    adapter = add_engram(model, layers=[1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2).engram_adapter
    assert adapter.config.table_init_std == 1.0
    assert adapter.engrams["1"].table.weight.std().item() == pytest.approx(1.0, rel=0.1)
    zero = EngramConfig(**{**adapter.config.to_dict(), "table_init_std": 0.0})
    other, x = tiny("llama"), ids(12, 3)
    with torch.no_grad():
        base = other(x).logits
    add_engram(other, layers=[1], config=zero)  # zero rows, projection at its init: still bit-identical
    rows = other.engram_adapter.engrams["1"].table.weight
    assert not rows.any() and other.engram_adapter.engrams["1"].proj.weight.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(other(x).logits, base)
    other(x, labels=x).loss.backward()
    assert rows.grad.abs().sum() > 0  # and the rows learn from the first step
    wake(model)
    save_engram_adapter(model, tmp_path / "adapter")
    meta_path = tmp_path / "adapter" / "engram_adapter.json"
    meta = json.loads(meta_path.read_text())
    width = meta.pop("hidden_size")
    config = meta["config"]
    config["vocab_size_per_ngram"] = config.pop("rows_per_head")
    config.update(hidden_size=width, n_branches=1, sparse_grad=False)
    meta_path.write_text(json.dumps(meta))
    other = tiny("llama")
    load_engram_adapter(other, tmp_path / "adapter")
    x = ids(12, 3)
    with torch.no_grad():
        assert torch.equal(other(x).logits, model(x).logits)
    config["hidden_size"] = 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="trained for width 64"):
        load_engram_adapter(tiny("llama"), tmp_path / "adapter")


def test_a_deep_copy_runs_its_own_adapter(tmp_path):
    """copy.deepcopy of a retrofitted model (a reference model, an EMA) hooks and saves its own
    adapter."""
    import copy

    model = tiny("llama")
    add_engram(model, layers=[1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2)
    wake(model)
    twin = copy.deepcopy(model)
    x = ids(10, 4)
    with torch.no_grad():
        before = model(x).logits
        assert torch.equal(twin(x).logits, before)
        for p in twin.engram_adapter.parameters():
            p.add_(0.5)
        assert not torch.equal(twin(x).logits, before)
        assert torch.equal(model(x).logits, before)  # the original still runs its own
        after = twin(x).logits
    twin.save_pretrained(tmp_path)  # and saves its own
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        assert torch.equal(load_engram_adapter(LlamaForCausalLM.from_pretrained(tmp_path), tmp_path)(x).logits, after)
