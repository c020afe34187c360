"""engram.analysis.gates and .ablation: gate values and heatmaps, Engram zeroed by hooks."""

import html
import json
import math

import numpy as np
import pytest
import torch

from engram import EngramLM
from engram.analysis.ablation import ablation_eval, ablation_report, engram_disabled, next_token_accuracy
from engram.analysis.gates import gate_heatmap_html, gate_heatmap_png, gate_values, plot_gates
from engram.config import EngramConfig, ModelConfig, MoEConfig
from engram.data.dataset import PreparedData
from engram.eval import evaluate
from engram.data.tokenizer import TokenStream, train_tokenizer

V, D, M = 300, 32, 2
TEXT = 'Alexander the Great <b>& "Princess" of Wales.\nBy the way, café 四大发明 张仲景'
CORPUS = ["Alexander the Great ruled Macedon. By the way, the Princess of Wales visited.",
          "Les cafés de Paris. 四大发明 and 张仲景 are known.", "<html> & 'quotes' \"double\""] * 10


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=V)


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(
        vocab_size=V, hidden_size=D, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=16, first_k_dense=1),
        n_streams=M, max_seq_len=128,
        engram=EngramConfig(compressed_vocab_size=V, pad_id=0, layer_ids=(1, 2), rows_per_head=(101, 103),
                            n_head_per_ngram=2, n_embed_per_ngram=16,
                            conv_zero_init=False, bias=True, table_init_std=1.0))  # untrained rows that say something
    torch.manual_seed(0)
    return EngramLM(config).eval()


def ids_of(tok, text=TEXT):
    return torch.tensor([tok.encode(text, add_special_tokens=False).ids])


def test_gate_values_match_the_models_own_forward(model, tok):
    res = gate_values(model, tok, TEXT)
    T = len(res["ids"])
    assert "".join(res["tokens"]) == TEXT and len(res["tokens"]) == T
    assert sorted(res["gates"]) == [1, 2]
    with torch.no_grad():
        own = model(ids_of(tok), return_intermediates=True).intermediates["gates"]
    for layer, g in res["gates"].items():
        assert isinstance(g, np.ndarray) and g.shape == (T, M) and g.dtype.kind == "f"
        assert np.array_equal(g, own[layer][0].numpy())
        assert ((g >= 0) & (g <= 1)).all()
    assert model.training is False


def test_html_has_every_token_escaped_and_one_span_per_token_per_row(model, tok, tmp_path):
    res = gate_values(model, tok, TEXT)
    page = gate_heatmap_html(res, tmp_path / "g.html", title="<gates>").read_text(encoding="utf-8")
    T = len(res["tokens"])
    assert page.count('<span class="tok"') == T * 2 * M  # 2 layers x M streams
    for tok_text in res["tokens"]:
        assert f">{html.escape(tok_text)}</span>" in page
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page and "&lt;gates&gt;" in page
    for layer in (1, 2):
        for m in range(M):
            assert f"layer {layer}, stream {m}" in page
    assert "rgb(255,255,255)" in page  # the legend's 0


def test_png_and_plot_gates(model, tok, tmp_path):
    res = gate_values(model, tok, TEXT)
    png = gate_heatmap_png(res, tmp_path / "g.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = plot_gates(model, tok, TEXT, tmp_path / "out")
    assert all(p.is_file() for p in paths.values())
    saved = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert np.allclose(saved["gates"]["1"], res["gates"][1])


def zero_value_copy(model):
    """A copy whose Engram output is zero by construction: W_V and its bias are zero. (A fresh
    model loaded with the same weights: copy.deepcopy fails on the tables' gather lock.)"""
    zeroed = EngramLM(model.config).eval()
    zeroed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in zeroed.engram_layers:
            proj = zeroed.blocks[layer].engram.proj
            proj.weight[:D].zero_()
            proj.bias[:D].zero_()
    return zeroed


def test_engram_disabled_equals_a_zero_value_model_and_unhooks(model, tok):
    ids = ids_of(tok)
    with torch.no_grad():
        original = model(ids).logits
        expected = zero_value_copy(model)(ids).logits
        with engram_disabled(model):
            ablated = model(ids).logits
            gated = model(ids, return_intermediates=True)  # the return_gates tuple path
        after = model(ids).logits
    assert (ablated - original).abs().max() > 1e-4  # the ablation changes something
    assert torch.allclose(ablated, expected, atol=1e-6)
    assert torch.allclose(gated.logits, expected, atol=1e-6) and sorted(gated.intermediates["gates"]) == [1, 2]
    assert torch.equal(after, original)
    assert all(not model.blocks[i].engram._forward_hooks for i in model.engram_layers)


def test_engram_disabled_unhooks_after_an_exception_and_checks_layers(model, tok):
    ids = ids_of(tok)
    with torch.no_grad():
        original = model(ids).logits
        with pytest.raises(RuntimeError, match="boom"):
            with engram_disabled(model, layers=[2]):
                assert model.blocks[2].engram._forward_hooks and not model.blocks[1].engram._forward_hooks
                raise RuntimeError("boom")
        assert torch.equal(model(ids).logits, original)
    assert all(not model.blocks[i].engram._forward_hooks for i in model.engram_layers)
    with pytest.raises(ValueError, match="no Engram module"):
        with engram_disabled(model, layers=[0]):
            pass


def test_ablation_report_known_values(model):
    def on_off(full, ablated):  # a metric that reads whether Engram is disabled
        return lambda m: ablated if m.blocks[1].engram._forward_hooks else full

    metrics = {"acc": on_off(0.8, 0.2), "loss": on_off(2.0, 3.0), "bpb": on_off(1.0, 1.5)}
    r = ablation_report(model, metrics, lower_is_better={"loss", "bpb"}, reference={"bpb": 2.0})
    assert r["acc"] == {"full": 0.8, "ablated": 0.2, "lower_is_better": False, "kept_fraction": pytest.approx(0.25)}
    ln_v = math.log(V)
    assert r["loss"]["reference"] == pytest.approx(ln_v)
    assert r["loss"]["kept_fraction"] == pytest.approx((ln_v - 3.0) / (ln_v - 2.0))
    assert r["loss"]["relative_increase"] == pytest.approx(0.5)
    assert r["bpb"]["kept_fraction"] == pytest.approx(0.5) and r["bpb"]["relative_increase"] == pytest.approx(0.5)
    assert not model.blocks[1].engram._forward_hooks
    with pytest.raises(ValueError, match="not among the metrics"):
        ablation_report(model, metrics, lower_is_better={"nope"})


def test_ablation_eval_on_a_prepared_dataset(model, tok, tmp_path):
    ids = np.array(tok.encode(" ".join(CORPUS[:3]) * 3, add_special_tokens=False).ids, dtype=np.uint16)
    ids.tofile(tmp_path / "val.bin")
    data = PreparedData(root=tmp_path, tokenizer=tok, train=None, val=TokenStream(tmp_path / "val.bin", "uint16"),
                        counts={"val": {"tokens": len(ids), "bytes": 3 * len(ids)}})
    r = ablation_eval(model, data, seq_len=16, max_windows=3)
    assert set(r) == {"val_loss", "val_bpb", "accuracy"}
    assert r["val_loss"]["full"] == pytest.approx(evaluate(model, data, 16, 3)["val_loss"])
    assert r["val_loss"]["ablated"] == pytest.approx(evaluate(zero_value_copy(model), data, 16, 3)["val_loss"])
    assert r["val_bpb"]["full"] == pytest.approx(r["val_loss"]["full"] / math.log(2) / 3)
    assert r["val_bpb"]["kept_fraction"] == pytest.approx(r["val_loss"]["kept_fraction"])
    assert r["accuracy"]["full"] == next_token_accuracy(model, data, 16, 3)
    with torch.no_grad():  # accuracy by hand on the first window
        w = next(data.val.windows(16))
        hand = (model(w[:, :-1]).logits.argmax(-1) == w[:, 1:]).float().mean().item()
    assert next_token_accuracy(model, data, 16, 1) == pytest.approx(hand)
