"""The training engine end to end: bf16 autocast against fp32, skipped non-finite steps and the
stop after too many, resume refused on another model or dataset, --compile wiring, and the
CLI's engine flags (`engram config`, --config, --grad-accum, --activation-checkpointing,
--dtype, --table-dtype, --device)."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engram.cli.main import main
from engram.model.transformer import EngramLM
from engram.train import engine
from engram.runs import list_checkpoints
from engram.train.loop import TrainConfig, TrainingDiverged, preset_config, train

QUIET = dict(log=lambda *a: None, progress=False)


def small_cfg(**changes):
    return TrainConfig(**{**dict(max_steps=4, batch_size=4, seq_len=32, eval_every=4, eval_windows=4,
                                 checkpoint_every=2, warmup_steps=2, sample_prompt=""), **changes})


def train_records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_bf16_autocast_training_tracks_fp32(small_dataset, tmp_path):
    """30 steps of `tiny` in bf16 autocast against the same run in fp32 (same seed, batches,
    init). bf16 rounds matmul inputs to 8 significant bits (~0.2% each); the weights, the
    optimizer and the loss stay float32, so the two runs drift apart only slowly: measured on
    this data, the train losses differ by at most 0.027 nats over the 30 steps and the final
    validation losses by 0.003, while the loss itself falls from 5.7 to ~1.1. Tolerances:
    0.1 nats per step, 0.05 nats for the final validation loss."""
    cfg = dict(max_steps=30, batch_size=8, seq_len=32, eval_every=30, eval_windows=16, checkpoint_every=30,
               warmup_steps=5, sample_prompt="")
    fp32 = train(tmp_path / "fp32", TrainConfig(**cfg), data_dir=small_dataset, **QUIET)
    bf16 = train(tmp_path / "bf16", TrainConfig(**cfg, dtype="bf16"), data_dir=small_dataset, **QUIET)
    a, b = train_records(tmp_path / "fp32"), train_records(tmp_path / "bf16")
    assert b[-1]["loss"] < b[0]["loss"] - 2, "bf16 training did not learn"
    worst = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    assert worst < 0.1, f"train losses differ by up to {worst:.4f} nats"
    assert abs(fp32["final_val_loss"] - bf16["final_val_loss"]) < 0.05, (fp32, bf16)
    weights = load_file(str(list_checkpoints(tmp_path / "bf16")[-1] / "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())  # master weights


def poison_training_forwards(monkeypatch, bad_calls):
    """Make the logits of the listed training forwards (1-based) NaN, as an overflow would."""
    calls = {"n": 0}
    forward = EngramLM.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if bad_calls(calls["n"]):
                out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(EngramLM, "forward", poisoned)


def test_non_finite_steps_are_skipped_and_counted(small_dataset, tmp_path, monkeypatch):
    poison_training_forwards(monkeypatch, lambda n: n in (3, 4))
    run = tmp_path / "run"
    summary = train(run, small_cfg(max_steps=6, checkpoint_every=1, keep_last=10), data_dir=small_dataset, **QUIET)
    records = train_records(run)
    assert [r["skipped"] for r in records] == [False, False, True, True, False, False]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    assert summary["skipped_steps"] == 2
    # no checkpoint of a skipped step; the optimizers stepped 4 times in 6 steps
    assert [p.name for p in list_checkpoints(run)] == [f"step_{s:08d}" for s in (1, 2, 5, 6)]
    state = load_file(str(list_checkpoints(run)[-1] / "optimizer.safetensors"))
    steps = {float(v) for k, v in state.items() if k.endswith(".step") and k.startswith("opt0.")}
    assert steps == {4.0}, steps
    assert json.loads((list_checkpoints(run)[-1] / "trainer.json").read_text())["skipped_steps"] == 2


def test_a_run_stops_after_max_bad_steps_in_a_row(small_dataset, tmp_path, monkeypatch, capsys):
    """From the third step on every loss is NaN: with --max-bad-steps 3 the run stops at step 5
    with one line and exit code 1; the checkpoints are the good ones (steps 1 and 2)."""
    poison_training_forwards(monkeypatch, lambda n: n >= 3)
    run = tmp_path / "run"
    code = main(["train", "--out", str(run), "--data", str(small_dataset), "--max-steps", "8", "--batch-size", "4",
                 "--seq-len", "32", "--eval-every", "100", "--checkpoint-every", "1", "--max-bad-steps", "3"])
    err = capsys.readouterr().err  # the progress bar, then the error
    message = err.split("engram: error: ")[-1]
    assert code == 1 and err.count("engram: error: ") == 1 and message.count("\n") == 1, err
    assert message.startswith("stopped at step 5: 3 steps in a row had a non-finite loss or gradient norm"), err
    assert "step_00000002" in message
    assert [p.name for p in list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    assert not (run / "summary.json").exists()
    weights = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert all(bool(w.isfinite().all()) for w in weights.values() if w.is_floating_point())
    with pytest.raises(TrainingDiverged, match="allow more with --max-bad-steps"):
        train(tmp_path / "api", small_cfg(max_steps=8, max_bad_steps=2), data_dir=small_dataset, **QUIET)


def other_dataset(small_dataset, tmp_path):
    """A copy of the dataset with 50 fewer training tokens (same tokenizer)."""
    copy = tmp_path / "other_data"
    shutil.copytree(small_dataset, copy)
    counts = json.loads((copy / "tokens.json").read_text())
    tokens = np.fromfile(copy / "train.bin", dtype=counts["train"]["dtype"])[:-50]
    tokens.tofile(copy / "train.bin")
    counts["train"]["tokens"] = len(tokens)
    (copy / "tokens.json").write_text(json.dumps(counts))
    return copy


def test_resume_refuses_another_model_or_dataset(small_dataset, tmp_path):
    run = tmp_path / "run"
    cfg = small_cfg(max_steps=2)
    train(run, cfg, data_dir=small_dataset, **QUIET)
    resumed = dict(data_dir=small_dataset, resume=True, **QUIET)
    with pytest.raises(ValueError, match=r"another model config \(n_layers: 4 -> 3\)"):
        train(run, cfg, model_overrides={"n_layers": 3}, **resumed)
    with pytest.raises(ValueError, match=r"other settings \(dtype: 'fp32' -> 'bf16'\)"):
        train(run, small_cfg(max_steps=2, dtype="bf16"), **resumed)
    with pytest.raises(ValueError, match="trained on another dataset"):
        train(run, cfg, data_dir=other_dataset(small_dataset, tmp_path), resume=True, **QUIET)
    # what may change: more steps, activation checkpointing
    summary = train(run, small_cfg(max_steps=3, activation_checkpointing=True), **resumed)
    assert summary["steps"] == 3


def test_model_must_fit_the_data(small_dataset, tmp_path):
    with pytest.raises(ValueError, match="vocab_size 8,192 but the dataset's tokenizer .* has 300 ids"):
        train(tmp_path / "a", small_cfg(), data_dir=small_dataset, model_config=preset_config("tiny"), **QUIET)
    with pytest.raises(ValueError, match="compresses to"):
        config = preset_config("tiny", vocab_size=300, compressed_vocab_size=299)
        train(tmp_path / "b", small_cfg(), data_dir=small_dataset, model_config=config, **QUIET)
    with pytest.raises(ValueError, match="seq_len 257 is longer than the model's max_seq_len 256"):
        train(tmp_path / "c", small_cfg(seq_len=257), data_dir=small_dataset, **QUIET)


def test_compile_flag_compiles_the_training_forward(small_dataset, tmp_path, monkeypatch):
    """Cheap wiring check (the real compile is the slow test below): --compile hands the model
    to engine.compile_logits once, and the steps run through what it returns."""
    calls = []

    def spy(model):
        calls.append(model)
        return lambda ids: (calls.append("forward"), model(ids).logits)[1]

    monkeypatch.setattr(engine, "compile_logits", spy)
    train(tmp_path / "run", small_cfg(max_steps=2, compile=True), data_dir=small_dataset, **QUIET)
    assert isinstance(calls[0], EngramLM) and calls[1:] == ["forward", "forward"]


@pytest.mark.slow
def test_compiled_training_matches_eager(small_dataset, tmp_path):
    """torch.compile (inductor, CPU) of the training forward and backward: the same losses as
    eager up to the order of float operations inductor fuses (1e-4 nats over 3 steps)."""
    eager = train(tmp_path / "eager", small_cfg(max_steps=3, eval_every=3), data_dir=small_dataset, **QUIET)
    compiled = train(tmp_path / "compiled", small_cfg(max_steps=3, eval_every=3, compile=True),
                     data_dir=small_dataset, **QUIET)
    a, b = train_records(tmp_path / "eager"), train_records(tmp_path / "compiled")
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-4
    assert abs(eager["final_val_loss"] - compiled["final_val_loss"]) < 1e-4


def test_cli_trains_a_config_with_the_engine_flags(small_dataset, tmp_path, capsys):
    model_json = tmp_path / "model.json"
    assert main(["config", "--preset", "tiny", "--data", str(small_dataset)]) == 0
    model_json.write_text(capsys.readouterr().out)
    config = json.loads(model_json.read_text())
    assert config["vocab_size"] == 300 and config["engram"]["compressed_vocab_size"] < 300
    config["n_layers"] = 3  # a shape of one's own
    model_json.write_text(json.dumps(config))
    run = tmp_path / "run"
    argv = ["train", "--config", str(model_json), "--out", str(run), "--data", str(small_dataset), "--max-steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--eval-every", "4", "--checkpoint-every",
            "2", "--device", "cpu", "--dtype", "bf16", "--table-dtype", "bf16", "--activation-checkpointing",
            "--table-optimizer", "sparse_adam"]
    assert main(argv) == 0, capsys.readouterr().err
    saved = json.loads((run / "run.json").read_text())
    assert saved["model"]["n_layers"] == 3 and "sparse_grad" not in saved["model"]["engram"]  # the optimizer's
    assert {k: saved["train"][k] for k in ("device", "dtype", "table_dtype", "grad_accum")} == \
        {"device": "cpu", "dtype": "bf16", "table_dtype": "bf16", "grad_accum": 2}
    weights = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert {str(w.dtype) for k, w in weights.items() if ".engram.table." in k} == {"torch.bfloat16"}
    capsys.readouterr()
    for cmd in (["eval", str(run), "--windows", "2"], ["generate", str(run), "--prompt", "the river",
                                                       "--max-new-tokens", "3"]):
        assert main(cmd + ["--device", "cpu", "--dtype", "bf16"]) == 0, capsys.readouterr().err
    # resuming with another precision, or without the config, is refused
    fp32 = list(argv)
    fp32[fp32.index("--dtype") + 1] = "fp32"
    assert main(fp32 + ["--resume"]) == 2
    assert "other settings (dtype: 'bf16' -> 'fp32'); resume with the same ones" in capsys.readouterr().err
    no_config = argv[:1] + argv[3:]
    assert main(no_config + ["--resume"]) == 2
    assert "another model config (n_layers: 3 -> 4)" in capsys.readouterr().err
    assert main(argv + ["--max-steps", "6", "--resume"]) == 0, capsys.readouterr().err


def test_cli_config_must_match_the_dataset_vocabulary(small_dataset, tmp_path, capsys):
    model_json = tmp_path / "model.json"
    assert main(["config", "--preset", "tiny"]) == 0  # sized to the default BPE, 8192 ids
    model_json.write_text(capsys.readouterr().out)
    code = main(["train", "--config", str(model_json), "--out", str(tmp_path / "r"), "--data", str(small_dataset)])
    err = capsys.readouterr().err
    assert code == 2 and "vocab_size 8,192 but the dataset's tokenizer" in err and "engram config" in err, err
