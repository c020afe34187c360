"""EngramConfig: validation messages that say how to fix it, a JSON round trip, and the
model's width and streams bound to its Engram modules (not repeated in the Engram config)."""

import dataclasses
import json

import pytest
import torch

from engram import Engram, EngramConfig, EngramLM, ModelConfig, NgramHasher, presets

BASE = dict(compressed_vocab_size=1000, pad_id=2, layer_ids=(1, 14), vocab_size_per_ngram=(5000, 5000),
            hidden_size=64)


def test_json_round_trip():
    cfg = EngramConfig(**BASE, n_branches=4, gate_norm_eps=None)
    again = EngramConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.layer_ids == (1, 14)
    assert (cfg.n_hash_heads, cfg.head_dim, cfg.memory_dim) == (16, 64, 1024)


@pytest.mark.parametrize("change, message", [
    (dict(vocab_size_per_ngram=(5000,)), r"one entry per order 2\.\.3 \(2 values\)"),
    (dict(max_ngram_size=1), "max_ngram_size must be in 2..8"),
    (dict(pad_id=1000), "map the tokenizer's pad id through CompressedTokenizer"),
    (dict(n_embed_per_ngram=500), r"must be divisible by n_head_per_ngram \(8\)"),
    (dict(layer_ids=(3, 3)), "must not repeat"),
    (dict(layer_ids=()), "one or more"),
    (dict(n_branches=0), "n_branches must be >= 1"),
    (dict(gate_norm_eps=0.0), "gate_norm_eps must be > 0 or None"),
    (dict(table_init_std=-0.5), r"table_init_std must be a finite number >= 0 \(1: N\(0, 1\) rows, 0: zero rows\)"),
    (dict(table_init_std=float("nan")), "table_init_std must be a finite number >= 0"),
])
def test_invalid_values_name_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig(**{**BASE, **change})


def test_unknown_fields_are_listed():
    with pytest.raises(ValueError, match=r"unknown EngramConfig fields \['hc_mult'\]"):
        EngramConfig.from_dict({**BASE, "hc_mult": 4})


def test_frozen():
    cfg = EngramConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.hidden_size = 3


# ---------------------------------------------------------------- Engram takes the model's width and streams
@pytest.mark.parametrize("config", [
    dataclasses.replace(presets.small(vocab_size=512, table_rows_per_head=101), hidden_size=384),
    presets.tiny(vocab_size=512, hidden_size=192, n_branches=4),
], ids=["small-width-384", "tiny-192-M4"])
def test_overriding_a_presets_width_builds_an_engram_of_that_width(config, rng):
    D, M = config.hidden_size, config.n_branches
    assert config.engram.hidden_size is None and config.engram.n_branches is None
    model = EngramLM(config).eval()
    for layer in config.engram.layer_ids:
        engram = model.blocks[layer].engram
        assert (engram.config.hidden_size, engram.config.n_branches) == (D, M)
        assert engram.proj.weight.shape == (D * (1 + M), config.engram.memory_dim)
        assert engram.key_norm.weight.shape == (M, D)
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (2, 9))).logits
    assert logits.shape == (2, 9, 512) and torch.isfinite(logits).all()


def test_model_config_json_round_trip_leaves_width_to_the_model():
    cfg = presets.tiny(vocab_size=512, hidden_size=192, n_branches=4)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert "hidden_size" not in data["engram"] and "n_branches" not in data["engram"]
    again = ModelConfig.from_dict(data)
    assert again == cfg
    assert again.engram_module_config == dataclasses.replace(cfg.engram, hidden_size=192, n_branches=4)


def test_old_config_files_with_the_models_width_in_engram_still_load():
    cfg = presets.small(vocab_size=512)
    old = cfg.to_dict()
    old["engram"] = {**old["engram"], "hidden_size": 256, "n_branches": 4}  # the format before issue 10
    assert ModelConfig.from_dict(json.loads(json.dumps(old))) == cfg
    explicit = dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, hidden_size=256, n_branches=4))
    assert explicit == cfg and explicit.engram.hidden_size is None  # an equal value is dropped


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 64, r"engram\.hidden_size=64 conflicts with the model's hidden_size=256; .*set hidden_size on ModelConfig"),
    ("n_branches", 1, r"engram\.n_branches=1 conflicts with the model's n_branches=4; .*set n_branches on ModelConfig"),
])
def test_an_engram_width_that_conflicts_with_the_model_is_an_error(field, value, message):
    cfg = presets.small(vocab_size=512)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, **{field: value}))
    old = cfg.to_dict()
    old["engram"] = {**old["engram"], field: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(old)


def test_a_standalone_engram_needs_width_and_streams():
    cfg = presets.tiny(vocab_size=512).engram
    sizes = NgramHasher.from_config(cfg).table_sizes[1]
    with pytest.raises(ValueError, match=r"hidden_size=None, n_branches=None; set them .*engram_module_config"):
        Engram(cfg, sizes)
    with pytest.raises(ValueError, match=r"n_branches=None"):
        Engram(dataclasses.replace(cfg, hidden_size=32), sizes)
    module = Engram(dataclasses.replace(cfg, hidden_size=32, n_branches=2), sizes)
    assert module.proj.weight.shape == (32 * 3, cfg.memory_dim)


def test_engram_changed_leaves_width_and_streams_to_the_model():
    from engram.experiments.common import engram_changed

    cfg = presets.tiny(vocab_size=512)
    assert engram_changed(cfg, use_gate=False).engram == dataclasses.replace(cfg.engram, use_gate=False)
    with pytest.raises(ValueError, match=r"\['n_branches'\] belong to the model.*dataclasses.replace\(config, n_branches="):
        engram_changed(cfg, n_branches=4)
