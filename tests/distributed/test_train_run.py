"""`train()` on gloo ranks: DCP checkpoints that resume exactly, reload bit-equal on another
world size or in one process, and load as a plain model for eval/generate."""

import json

import pytest

import torch

from .launch import run_ranks


def cfg(**kw):
    from engram.train.loop import TrainConfig

    base = dict(preset="tiny", max_steps=4, batch_size=4, seq_len=32, eval_every=2, eval_windows=3,
                checkpoint_every=2, warmup_steps=2, sample_prompt="", table_optimizer="sparse_adam", device="cpu")
    return TrainConfig(**{**base, **kw})


def _train(rank, world_size, out, data, kw, resume):
    from engram.train.loop import train

    return train(out, cfg(**kw), data_dir=data, resume=resume, progress=False, log=lambda *a: None)


def reloaded(ckpt, table_optimizer="sparse_adam", parallel=False) -> dict:
    """A checkpoint loaded as a run would resume it: weights and optimizer state by name (a
    sharded table's slice with its first row)."""
    from engram.distributed import parallelize
    from engram.distributed.checkpoint import load_training_state
    from engram.model.io import load_model
    from engram.train.optim import build_optimizers

    model = load_model(ckpt)
    tables = parallelize(model).tables if parallel else {}
    optimizers = build_optimizers(model, lr=1.0, table_optimizer=table_optimizer)
    load_training_state(ckpt, model, optimizers)
    names = {id(p): n for n, p in model.named_parameters()}
    starts = {f"blocks.{layer}.engram.table.weight": t.row_start for layer, t in tables.items()}
    out = {}
    for name, p in model.named_parameters():
        out[f"w.{name}"] = p.detach().clone()
    for i, opt in enumerate(optimizers):
        for p, st in opt.state.items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    out[f"o{i}.{names[id(p)]}.{k}"] = v.clone()
    out["lr"] = torch.tensor([g["lr"] for opt in optimizers for g in opt.param_groups])
    return {"state": out, "starts": starts}


def _reload(rank, world_size, ckpt):
    return reloaded(ckpt, parallel=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, small_dataset):
    """A 2-rank run stopped after step 2 (checkpoint step_00000002)."""
    run = tmp_path_factory.mktemp("dist") / "run"
    run_ranks(_train, 2, run, small_dataset, {"max_steps": 2}, False, timeout=300)
    return run


def test_two_ranks_resume_exactly_and_reshard_bit_equal(tmp_path, small_dataset, two_rank_run):
    import shutil

    from engram.model.io import load_model

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    a = run_ranks(_train, 2, whole, small_dataset, {}, False, timeout=300)[0]
    shutil.copytree(two_rank_run, cut)
    ckpt = cut / "checkpoints" / "step_00000002"
    assert (ckpt / "dcp" / ".metadata").is_file()
    assert json.loads((ckpt / "trainer.json").read_text())["world_size"] == 2
    b = run_ranks(_train, 2, cut, small_dataset, {}, True, timeout=300)[0]
    assert b["final_val_loss"] == a["final_val_loss"], (a, b)  # killed and resumed = uninterrupted, exactly
    metrics = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4]

    # the 2-rank checkpoint reloads bit-equal in one process and on 4 ranks (resharded)
    one = reloaded(ckpt)["state"]
    for res in run_ranks(_reload, 4, ckpt, timeout=300):
        for key, value in res["state"].items():
            name = key.split(".", 1)[-1]
            ref = one[key]
            start = res["starts"].get(name.rsplit(".", 1)[0] if key.startswith("o") else name)
            if start is not None and value.dim() > 0 and value.shape != ref.shape:
                ref = ref[start:start + value.shape[0]]
            assert torch.equal(value, ref), key
    # and as a plain model (engram eval / generate / info): the same weights
    model = load_model(ckpt)
    assert all(torch.equal(p, one[f"w.{n}"]) for n, p in model.named_parameters())


def test_cli_reads_a_distributed_run(tmp_path, two_rank_run, capsys):
    """`engram info`, `offload`, and `eval` served from the offloaded tables, on a 2-rank run."""
    from engram.cli.main import main

    run = two_rank_run
    assert main(["info", str(run)]) == 0
    assert main(["offload", str(run), "--out", str(tmp_path / "tables")]) == 0
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    plain = capsys.readouterr().out
    assert main(["eval", str(run), "--device", "cpu", "--tables", str(tmp_path / "tables")]) == 0
    served = capsys.readouterr().out
    loss = [line for line in plain.splitlines() if "loss" in line][0]
    assert loss in served  # the same validation loss from the disk tables


@pytest.mark.slow
def test_resume_on_other_world_sizes(tmp_path, small_dataset):
    """4 ranks -> 2 ranks, and 4 ranks -> one process: both resume and finish the run."""
    from engram.train.loop import train

    for name, resume in (("two", lambda out: run_ranks(_train, 2, out, small_dataset, {}, True, timeout=300)[0]),
                         ("one", lambda out: train(out, cfg(), data_dir=small_dataset, resume=True, progress=False,
                                                   log=lambda *a: None))):
        out = tmp_path / name
        run_ranks(_train, 4, out, small_dataset, {"max_steps": 2}, False, timeout=300)
        summary = resume(out)
        assert summary["steps"] == 4 and summary["final_val_loss"] is not None
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "train"]
        assert steps == [1, 2, 3, 4]
