"""Training end to end: falling loss, exact resume after SIGKILL, corrupt checkpoint fallback."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from engram.runs import list_checkpoints
from engram.train.loop import TrainConfig, train

ARGS = ["--preset", "tiny", "--max-steps", "12", "--batch-size", "4", "--seq-len", "32", "--eval-every", "6",
        "--checkpoint-every", "3", "--seed", "3"]


def run_cli(out, data, *extra, wait=True):
    cmd = [sys.executable, "-m", "engram", "train", "--out", str(out), "--data", str(data), *ARGS, *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def final_weights(out):
    return load_file(str(list_checkpoints(out)[-1] / "model.safetensors"))


def comparable_metrics(out):
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def newest_step(out):
    checkpoints = list_checkpoints(out)
    return int(checkpoints[-1].name.removeprefix("step_")) if checkpoints else 0


def logged_steps(out):
    """Steps in metrics.jsonl (a kill may tear the last line: it is left out)."""
    steps = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def test_loss_falls_and_artifacts_exist(small_dataset, tmp_path):
    cfg = TrainConfig(max_steps=30, batch_size=8, seq_len=32, eval_every=10, checkpoint_every=10, lr=3e-3,
                      warmup_steps=5, sample_prompt="the river")
    summary = train(tmp_path / "run", cfg, data_dir=small_dataset, log=lambda *a: None, progress=False)
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.5, summary
    run = tmp_path / "run"
    for name in ("run.json", "metrics.jsonl", "loss_curve.png", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert [p.name for p in list_checkpoints(run)] == ["step_00000010", "step_00000020", "step_00000030"]
    assert summary["sample"].startswith("the river")


@pytest.mark.parametrize("table_optimizer", ["adam", "sparse_adam"])
def test_resume_after_sigkill_is_exact(small_dataset, tmp_path, table_optimizer):
    extra = ("--table-optimizer", table_optimizer)
    ref = run_cli(tmp_path / "ref", small_dataset, *extra)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    for delay_checkpoints in (1, 2):  # kill twice, at different moments
        proc = run_cli(out, small_dataset, *extra, *(["--resume"] if out.exists() else []), wait=False)
        # wait for 1 (then 2) more checkpoints (every 3 steps), never the final one at step 12
        target = min(newest_step(out) + 3 * delay_checkpoints, 9)
        deadline = time.time() + 300
        while newest_step(out) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.05 * delay_checkpoints)  # somewhere inside the next steps, maybe mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the kill landed mid-run: the run had started (its checkpoints are there) and had not
        # finished (killed by the signal, not exited; no final checkpoint, no summary)
        assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (exit {proc.returncode}) before the kill"
        assert newest_step(out) >= target, "killed before the run got going (deadline passed?)"
        assert logged_steps(out), "no training step was logged before the kill"
        assert not (out / "summary.json").exists(), "the run had finished before the kill"
    done = run_cli(out, small_dataset, *extra, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = final_weights(tmp_path / "ref"), final_weights(out)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"weights differ after resume: {diff[:5]}"
    assert comparable_metrics(tmp_path / "ref") == comparable_metrics(out)


def test_corrupt_checkpoint_falls_back_to_the_previous(small_dataset, tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, seq_len=32, eval_every=3, checkpoint_every=2, sample_prompt="")
    run = tmp_path / "run"
    train(run, cfg, data_dir=small_dataset, log=lambda *a: None, progress=False)
    newest = list_checkpoints(run)[-1]
    blob = newest / "model.safetensors"
    blob.write_bytes(blob.read_bytes()[: blob.stat().st_size // 2])  # truncated
    messages = []
    summary = train(run, TrainConfig(**{**cfg.to_dict(), "max_steps": 8}), data_dir=small_dataset, resume=True,
                    log=messages.append, progress=False)
    assert any("step_00000006" in m and "checksum" in m for m in messages), messages
    assert any("resuming from step_00000004" in m for m in messages), messages
    assert summary["steps"] == 8


def test_resume_with_other_settings_is_refused(small_dataset, tmp_path):
    cfg = TrainConfig(max_steps=2, batch_size=4, seq_len=32, eval_every=2, checkpoint_every=2, sample_prompt="")
    train(tmp_path / "run", cfg, data_dir=small_dataset, log=lambda *a: None, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.003 -> 0.01\); resume with the same ones \(only --max-steps"):
        train(tmp_path / "run", TrainConfig(**{**cfg.to_dict(), "lr": 1e-2}), data_dir=small_dataset,
              resume=True, log=lambda *a: None, progress=False)


def test_a_run_begun_with_n01_tables_resumes_under_the_zero_init_default(small_dataset, tmp_path):
    """A run whose run.json predates zero-initialized tables (no table_init_std: N(0, 1)) resumes
    with the same preset: the init does not matter once the weights come from a checkpoint. It
    keeps its own config; any other change of the model is still refused."""
    cfg = TrainConfig(max_steps=2, batch_size=4, seq_len=32, eval_every=2, checkpoint_every=2, sample_prompt="")
    out = tmp_path / "run"
    train(out, cfg, data_dir=small_dataset, log=lambda *a: None, progress=False)
    run = json.loads((out / "run.json").read_text())
    del run["model"]["engram"]["table_init_std"]  # as written before the field existed
    (out / "run.json").write_text(json.dumps(run))
    summary = train(out, TrainConfig(**{**cfg.to_dict(), "max_steps": 4}), data_dir=small_dataset, resume=True,
                    log=lambda *a: None, progress=False)
    assert summary["steps"] == 4 and newest_step(out) == 4
    with pytest.raises(ValueError, match=r"another model config \(n_layers: 4 -> 3\)"):
        train(out, TrainConfig(**{**cfg.to_dict(), "max_steps": 6}), data_dir=small_dataset, resume=True,
              model_overrides={"n_layers": 3}, log=lambda *a: None, progress=False)
