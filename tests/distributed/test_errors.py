"""Bad distributed input is a clear error on every rank, never a hang."""

import os
import subprocess
import sys

from .launch import run_ranks
from .test_train_run import cfg


def _train_with(rank, world_size, out, data, kw_by_rank, die_at_step):
    import engram.train.loop as loop

    if die_at_step is not None and rank == 1:
        step = loop.train_step

        def dying(*a, _n=[0], **k):
            _n[0] += 1
            if _n[0] == die_at_step:
                os._exit(3)  # a rank killed mid-run
            return step(*a, **k)

        loop.train_step = dying
    return loop.train(out, cfg(**kw_by_rank[rank]), data_dir=data, progress=False, log=lambda *a: None)


def test_configs_that_differ_across_ranks_fail_on_every_rank(tmp_path, small_dataset):
    got = run_ranks(_train_with, 2, tmp_path / "r", small_dataset, [{"seed": 0}, {"seed": 1}], None,
                    outcomes=True, timeout=120)
    for status, value in got:
        assert status == "error" and "differs across ranks" in value, value


def test_a_rank_that_dies_is_an_error_on_the_others_not_a_hang(tmp_path, small_dataset):
    got = run_ranks(_train_with, 2, tmp_path / "r", small_dataset, [{}, {}], 2, outcomes=True, timeout=120)
    assert got[1] == ("died", 3)
    status, value = got[0]
    assert status == "error", value  # gloo reports the lost peer; the launcher's 120 s deadline was not needed
    assert not (tmp_path / "r" / "checkpoints" / "step_00000002").exists()


def test_cli_nproc_runs_torchrun_and_rejects_a_batch_it_cannot_split(tmp_path, small_dataset):
    base = [sys.executable, "-m", "engram", "train", "--nproc", "2", "--preset", "tiny", "--data", str(small_dataset),
            "--max-steps", "2", "--seq-len", "32", "--eval-every", "2", "--checkpoint-every", "2", "--device", "cpu",
            "--table-optimizer", "row_adam"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--batch-size", "3"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert bad.returncode == 2 and "must split into 2 ranks" in bad.stderr, bad.stderr[-2000:]
    ok = subprocess.run(base + ["--out", str(tmp_path / "ok"), "--batch-size", "4", "--fsdp"], capture_output=True,
                        text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert ok.stdout.count("validation loss") == 1  # rank 0 alone prints
    assert (tmp_path / "ok" / "checkpoints" / "step_00000002" / "dcp" / ".metadata").is_file()
    assert (tmp_path / "ok" / "loss_curve.png").is_file()
