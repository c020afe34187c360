"""Bad distributed input is a clear error on every rank, never a hang."""

import json
import os
import subprocess
import sys

from .launch import run_ranks
from .test_train_run import cfg


def _train_with(rank, world_size, out, data, kw_by_rank, die_at_step):
    import engram.train.loop as loop
    import engram.train.trainer as trainer

    if die_at_step is not None and rank == 1:
        step = trainer.train_step

        def dying(*a, _n=[0], **k):
            _n[0] += 1
            if _n[0] == die_at_step:
                os._exit(3)  # a rank killed mid-run
            return step(*a, **k)

        trainer.train_step = dying
    return loop.train(out, cfg(**kw_by_rank[rank]), data_dir=data, progress=False, log=lambda *a: None)


def test_configs_that_differ_across_ranks_fail_on_every_rank(tmp_path, small_dataset):
    got = run_ranks(_train_with, 2, tmp_path / "r", small_dataset, [{"seed": 0}, {"seed": 1}], None,
                    outcomes=True, timeout=120)
    for status, value in got:
        assert status == "error" and "differs across ranks" in value, value


def test_a_rank_that_dies_is_an_error_on_the_others_and_the_job_resumes(tmp_path, small_dataset):
    """Rank 1 is killed in step 3: rank 0 fails (gloo reports the lost peer; the launcher's
    120 s deadline is not needed), the step-2 checkpoint stays good, and the restarted job
    finishes from it (that such a resume equals an uninterrupted run exactly is
    test_train_run's)."""
    from engram.runs import list_checkpoints, verify_checkpoint

    run = tmp_path / "r"
    got = run_ranks(_train_with, 2, run, small_dataset, [{}, {}], 3, outcomes=True, timeout=120)
    assert got[1] == ("died", 3)
    assert got[0][0] == "error", got[0][1]
    assert [c.name for c in list_checkpoints(run)] == ["step_00000002"]
    verify_checkpoint(run / "checkpoints" / "step_00000002")
    resumed = run_ranks(_resume, 2, run, small_dataset, timeout=120)[0]
    assert resumed["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def _resume(rank, world_size, out, data):
    from engram.train.loop import train

    return train(out, cfg(), data_dir=data, resume=True, progress=False, log=lambda *a: None)


def test_cli_nproc_runs_torchrun_and_rejects_a_batch_it_cannot_split(tmp_path, small_dataset):
    base = [sys.executable, "-m", "engram", "train", "--nproc", "2", "--preset", "tiny", "--data", str(small_dataset),
            "--max-steps", "2", "--seq-len", "32", "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu",
            "--table-optimizer", "row_adam"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--batch-size", "3"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "does not split into 2 processes" in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().count("\n") == 0 and "torchrun" not in bad.stderr  # one line, refused before launching
    (tmp_path / "empty").mkdir()  # an error the ranks meet: one line from the parent, not torchrun's report
    ranks = subprocess.run([a if a != str(small_dataset) else str(tmp_path / "empty") for a in base]
                           + ["--out", str(tmp_path / "r"), "--batch-size", "4"], capture_output=True, text=True,
                           timeout=300, env=env)
    lines = [line for line in ranks.stderr.splitlines() if not line.startswith("running: torchrun")]
    assert ranks.returncode == 2 and len(lines) == 1 and lines[0].startswith("engram: error: "), ranks.stderr[-3000:]
    assert "in the training processes" in lines[0] and "Traceback" not in ranks.stderr
    ok = subprocess.run(base + ["--out", str(tmp_path / "ok"), "--batch-size", "4", "--fsdp"], capture_output=True,
                        text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("validation loss") == 1  # rank 0 alone prints
    assert (tmp_path / "ok" / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()
    assert (tmp_path / "ok" / "loss_curve.png").is_file()
