"""PEFT on a model with a retrofitted Engram adapter: asked to (`modules_to_save`), it trains
the adapter the hooks run; LoRA + Engram round-trip through PeftModel files; a merged model's
`save_pretrained` keeps the adapter beside the base weights, and loading restores it."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from engram.hf import add_engram, load_engram_adapter  # noqa: E402
from engram.hf.retrofit import active_adapter  # noqa: E402

pytestmark = pytest.mark.hf

V = 97


def base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        pad_token_id=0))


def with_engram():
    return add_engram(base(), layers=[1], rows_per_head=211, n_embed_per_ngram=16, n_head_per_ngram=2, seed=0)


def lora(model, engram: bool):
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                             modules_to_save=["engram_adapter"] if engram else None)
    return peft.get_peft_model(model, config)


def batch(seed=0):
    return torch.randint(1, V, (4, 16), generator=torch.Generator().manual_seed(seed))


def train(model, steps=4):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step in range(steps):
        x = batch(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_peft_trains_the_engram_adapter_when_asked():
    plain = lora(with_engram(), engram=False)
    assert not any(p.requires_grad for n, p in plain.named_parameters() if "engram_adapter" in n)  # PEFT's default
    lora_only = train(plain)

    model = lora(with_engram(), engram=True)
    copy = active_adapter(model.base_model.model)
    original = model.base_model.model.engram_adapter.original_module
    assert copy is not original and all(p.requires_grad for p in copy.parameters())
    before = {n: p.detach().clone() for n, p in copy.named_parameters()}
    both = train(model)
    assert both[0] == pytest.approx(lora_only[0])  # the value projections start at zero: the same first loss
    assert both[-1] != pytest.approx(lora_only[-1], abs=1e-4)  # then the trained Engram copy changes the model
    assert any(not torch.equal(before[n], p) for n, p in copy.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in original.named_parameters())  # the original stays as loaded
    with model.disable_adapter(), torch.no_grad():  # PEFT's switch turns the copy off too
        off = model(input_ids=batch()).logits
        assert torch.equal(off, base()(input_ids=batch()).logits)


def test_lora_and_engram_round_trip_and_the_merged_save_keeps_the_adapter(tmp_path):
    model = lora(with_engram(), engram=True)
    train(model)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=batch(9)).logits
    model.save_pretrained(tmp_path / "peft")
    again = peft.PeftModel.from_pretrained(with_engram(), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=batch(9)).logits, want, rtol=0, atol=1e-6)

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    weights = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any(k.startswith("engram_adapter.") for k in weights)  # kept apart, not dropped on load
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        without = plain(input_ids=batch(9)).logits
        restored = load_engram_adapter(plain, tmp_path / "merged")(input_ids=batch(9)).logits
        merged_logits = merged(input_ids=batch(9)).logits
    torch.testing.assert_close(merged_logits, want, rtol=0, atol=1e-4)  # merging LoRA rounds a little
    torch.testing.assert_close(restored, merged_logits, rtol=0, atol=1e-6)
    assert (without - restored).abs().max() > 1e-3  # without the adapter the model is another one
