"""Configs: validation messages that say how to fix it, a JSON round trip, the model's width and
streams given to its Engram modules (not repeated in the Engram config), and stored files with
old field names that still load (tests/data/old_run.json, docs/names.md)."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import engram.config
from engram import Engram, EngramConfig, EngramLM, HashLayout, ModelConfig, NgramHasher, presets

BASE = dict(compressed_vocab_size=1000, pad_id=2, layer_ids=(1, 14), rows_per_head=(5000, 5000))
OLD_RUN = Path(__file__).resolve().parents[1] / "data" / "old_run.json"


@pytest.fixture
def old_field_log(caplog, monkeypatch):
    """The `engram.config` log, with the once-per-process memory of old fields emptied."""
    monkeypatch.setattr(engram.config, "_reported", set())
    caplog.set_level(logging.INFO, logger="engram.config")
    return caplog


def test_json_round_trip():
    cfg = EngramConfig(**BASE, gate_norm_eps=None)
    again = EngramConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.layer_ids == (1, 14)
    assert (cfg.n_hash_heads, cfg.row_dim, cfg.memory_dim) == (16, 64, 1024)


@pytest.mark.parametrize("change, message", [
    (dict(rows_per_head=(5000,)), r"rows_per_head needs one entry per order 2\.\.3 \(2 values\)"),
    (dict(max_ngram_size=1), "max_ngram_size must be in 2..8"),
    (dict(pad_id=1000), "map the tokenizer's pad id through CompressedTokenizer"),
    (dict(n_embed_per_ngram=500), r"must be divisible by n_head_per_ngram \(8\)"),
    (dict(layer_ids=(3, 3)), "must not repeat"),
    (dict(layer_ids=()), "one or more"),
    (dict(gate_norm_eps=0.0), "gate_norm_eps must be > 0 or None"),
    (dict(table_init_std=-0.5), r"table_init_std must be a finite number >= 0 \(1: N\(0, 1\) rows, 0: zero rows\)"),
    (dict(table_init_std=float("nan")), "table_init_std must be a finite number >= 0"),
])
def test_invalid_values_name_the_fix(change, message):
    with pytest.raises(ValueError, match=message):
        EngramConfig(**{**BASE, **change})


def test_invalid_stream_count_names_the_fix():
    with pytest.raises(ValueError, match=r"n_streams must be >= 1 \(1 = plain residual\)"):
        presets.tiny(n_streams=0)


def test_unknown_fields_are_listed():
    with pytest.raises(ValueError, match=r"unknown EngramConfig field\(s\) \['hc_mult'\]"):
        EngramConfig.from_dict({**BASE, "hc_mult": 4})


@pytest.mark.parametrize("field, value, need", [("hidden_size", "big", "int"), ("n_layers", 2.5, "int"),
                                                ("tie_embeddings", 1, "bool"), ("n_kv_heads", True, "int | None")])
def test_wrongly_typed_fields_are_named(field, value, need):
    data = ModelConfig(vocab_size=64, hidden_size=32, n_layers=2, n_heads=2, mlp_hidden_size=64).to_dict()
    with pytest.raises(ValueError, match=f"field '{field}' must be {need.replace('|', '[|]')}, got"):
        ModelConfig.from_dict({**data, field: value})
    with pytest.raises(ValueError, match=r"field 'layer_ids' must be tuple\[int, ...\], got '1,2'"):
        EngramConfig.from_dict({**BASE, "layer_ids": "1,2"})


def test_frozen():
    cfg = EngramConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.seed = 3


# ---------------------------------------------------------------- Engram takes the model's width and streams
@pytest.mark.parametrize("config", [
    dataclasses.replace(presets.small(vocab_size=512, rows_per_head=101), hidden_size=384),
    presets.tiny(vocab_size=512, hidden_size=192, n_streams=4),
], ids=["small-width-384", "tiny-192-M4"])
def test_overriding_a_presets_width_builds_an_engram_of_that_width(config, rng):
    D, M = config.hidden_size, config.n_streams
    model = EngramLM(config).eval()
    for layer in config.engram.layer_ids:
        engram = model.blocks[layer].engram
        assert (engram.hidden_size, engram.n_streams) == (D, M)
        assert engram.proj.weight.shape == (D * (1 + M), config.engram.memory_dim)
        assert engram.key_norm.weight.shape == (M, D)
    with torch.no_grad():
        logits = model(torch.randint(0, 512, (2, 9))).logits
    assert logits.shape == (2, 9, 512) and torch.isfinite(logits).all()


def test_model_config_json_round_trip():
    cfg = presets.tiny(vocab_size=512, hidden_size=192, n_streams=4)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["n_streams"] == 4 and "rows_per_head" in data["engram"]
    assert not {"hidden_size", "n_branches", "n_streams", "sparse_grad"} & set(data["engram"])
    assert ModelConfig.from_dict(data) == cfg


def test_a_standalone_engram_takes_width_and_streams():
    cfg = presets.tiny(vocab_size=512).engram
    sizes = NgramHasher.from_config(cfg).table_sizes[1]
    with pytest.raises(TypeError, match="hidden_size"):
        Engram(cfg, sizes)
    with pytest.raises(ValueError, match=r"n_streams 1: plain residual.*n_streams=0"):
        Engram(cfg, sizes, hidden_size=32, n_streams=0)
    module = Engram(cfg, sizes, hidden_size=32, n_streams=2)
    assert module.proj.weight.shape == (32 * 3, cfg.memory_dim)


@pytest.mark.parametrize("field", ["hidden_size", "n_streams"])
def test_engram_changed_leaves_width_and_streams_to_the_model(field):
    from engram.experiments.common import engram_changed

    cfg = presets.tiny(vocab_size=512)
    assert engram_changed(cfg, use_gate=False).engram == dataclasses.replace(cfg.engram, use_gate=False)
    with pytest.raises(ValueError, match=rf"\['{field}'\] belong to the model.*dataclasses.replace\(config, {field}="):
        engram_changed(cfg, **{field: 4})


# ---------------------------------------------------------------- stored files with old field names
def old_run():
    return json.loads(OLD_RUN.read_text())


def new_names_config():
    """What tests/data/old_run.json holds, written with today's names."""
    cfg = presets.small(vocab_size=512, compressed_vocab_size=480, pad_id=1, rows_per_head=1009)
    return dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, table_init_std=1.0))


def test_the_stored_old_run_json_loads_with_todays_names(old_field_log):
    old = old_run()["model"]
    assert {"n_branches"} <= set(old) and {"vocab_size_per_ngram", "sparse_grad"} <= set(old["engram"])
    config = ModelConfig.from_dict(old)
    assert config == new_names_config()
    assert (config.n_streams, config.engram.rows_per_head, config.engram.table_init_std) == (4, (1009, 1009), 1.0)
    again = config.to_dict()
    assert "n_branches" not in again and not {"vocab_size_per_ngram", "sparse_grad"} & set(again["engram"])


def test_reading_old_names_is_logged_once(old_field_log):
    ModelConfig.from_dict(old_run()["model"])
    notes = [r.getMessage() for r in old_field_log.records if r.name == "engram.config"]
    assert "engram.config: old field n_branches read as n_streams" in notes
    assert "engram.config: old field vocab_size_per_ngram read as rows_per_head" in notes
    assert any(n.startswith("engram.config: old field engram.sparse_grad dropped") for n in notes)
    assert len(notes) == len(set(notes)) == 3
    old_field_log.clear()
    ModelConfig.from_dict(old_run()["model"])  # a second load (a checkpoint's config is read often)
    assert not [r for r in old_field_log.records if r.name == "engram.config"]


def test_the_old_run_json_builds_the_same_model_as_todays_names(old_field_log):
    compression = np.arange(512) % 480
    old = EngramLM(ModelConfig.from_dict(old_run()["model"]), compression=compression, device="meta")
    new = EngramLM(new_names_config(), compression=compression, device="meta")
    shapes = {k: tuple(v.shape) for k, v in new.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in old.state_dict().items()} == shapes
    assert old.layout.to_dict() == new.layout.to_dict()
    assert old.blocks[1].engram.n_streams == 4 and shapes["blocks.1.engram.table.weight"][1] == 16


def test_the_format_before_issue_10_with_the_models_width_in_engram_still_loads(old_field_log):
    old = old_run()["model"]
    old["engram"] = {**old["engram"], "hidden_size": 256, "n_branches": 4}
    assert ModelConfig.from_dict(old) == new_names_config()
    notes = [r.getMessage() for r in old_field_log.records]
    assert "engram.config: old field engram.n_branches dropped (the Engram modules take the model's n_streams)" in notes


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 64, r"engram\.hidden_size=64 conflicts with the model's hidden_size=256; .*set hidden_size on ModelConfig"),
    ("n_branches", 1, r"engram\.n_branches=1 conflicts with the model's n_streams=4; .*set n_streams on ModelConfig"),
])
def test_an_old_engram_width_that_conflicts_with_the_model_is_an_error(field, value, message):
    old = old_run()["model"]
    old["engram"] = {**old["engram"], field: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(old)


def test_a_file_with_both_a_name_and_its_old_name_is_refused():
    old = old_run()["model"]
    with pytest.raises(ValueError, match="both n_streams and its old name n_branches"):
        ModelConfig.from_dict({**old, "n_streams": 4})
    with pytest.raises(ValueError, match="both rows_per_head and its old name vocab_size_per_ngram"):
        EngramConfig.from_dict({**old["engram"], "rows_per_head": [1009, 1009]})


def test_an_old_hash_layout_loads(old_field_log, tmp_path):
    layout = HashLayout.from_config(new_names_config().engram)
    old = layout._fields()  # as saved then: before the rename, before fields_sha256
    old["vocab_size_per_ngram"] = old.pop("rows_per_head")
    (tmp_path / "hash_layout.json").write_text(json.dumps(old))
    assert HashLayout.load(tmp_path / "hash_layout.json", expect=new_names_config().engram) == layout
    assert "engram.config: old hash layout field vocab_size_per_ngram read as rows_per_head" in old_field_log.messages


def test_the_hf_config_reads_old_names_and_keeps_todays(old_field_log):
    pytest.importorskip("transformers")
    from engram.hf.config import EngramLMConfig

    old = old_run()["model"]
    layout = HashLayout.from_config(new_names_config().engram)._fields()
    layout["vocab_size_per_ngram"] = layout.pop("rows_per_head")
    hf = EngramLMConfig(engram_model=old, hash_layout=layout)
    assert hf.model_config == new_names_config()
    assert hf.engram_model == new_names_config().to_dict() and "rows_per_head" in hf.hash_layout
    assert "engram.config: old field n_branches read as n_streams" in old_field_log.messages


# ---------------------------------------------------------------- table_init_std: zero for new models, 1 for old files
def test_new_models_start_with_zero_rows_and_the_field_is_always_written():
    cfg = presets.tiny(vocab_size=512)
    assert EngramConfig(**BASE).table_init_std == 0.0 and cfg.engram.table_init_std == 0.0
    assert cfg.to_dict()["engram"]["table_init_std"] == 0.0
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # 0 stays 0
    torch.manual_seed(0)
    model = EngramLM(cfg)
    assert not model.blocks[1].engram.table.weight.any()


def test_a_stored_config_without_table_init_std_loads_as_one(old_field_log):
    old = old_run()["model"]
    assert old["engram"]["table_init_std"] == 1.0  # the stored run wrote the field: N(0, 1)
    assert ModelConfig.from_dict(old).engram.table_init_std == 1.0
    del old["engram"]["table_init_std"]  # a file from before the field existed
    config = ModelConfig.from_dict(old)
    assert config.engram.table_init_std == 1.0 and config == new_names_config()
    assert config.to_dict()["engram"]["table_init_std"] == 1.0
    assert any("table_init_std missing" in m and "read as 1.0" in m for m in old_field_log.messages)
    engram_only = EngramConfig.from_dict({k: v for k, v in EngramConfig(**BASE).to_dict().items()
                                          if k != "table_init_std"})
    assert engram_only.table_init_std == 1.0
    torch.manual_seed(0)
    model = EngramLM(config, compression=np.arange(512) % 480)
    assert model.blocks[1].engram.table.weight.std().item() == pytest.approx(1.0, rel=0.05)


def test_the_demo_compat_config_keeps_n01_rows():
    from engram.compat.reference import reference_config

    demo = dict(engram_vocab_size=[211, 211], max_ngram_size=3, n_embed_per_ngram=32, n_head_per_ngram=4,
                layer_ids=[1, 5], kernel_size=4, hidden_size=32, hc_mult=4)
    assert reference_config(compressed_vocab_size=97, compressed_pad_id=2, **demo).table_init_std == 1.0
