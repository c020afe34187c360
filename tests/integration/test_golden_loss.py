"""A silent training regression fails here: the `tiny` preset's first 50 steps on a fixed dataset
must reproduce the losses stored in tests/data/golden_tiny.json.

The dataset is the generated `small_dataset` (60 documents drawn from a seeded generator, a
300-id BPE): no download, the same bytes on every machine. Tolerance, per recorded loss: 0.03
nats for a training step and 0.02 for the validation loss. On one machine the run is
deterministic (the SIGKILL-resume test checks bit equality); across CPUs the BLAS kernels add
in other orders, which moved 400-step losses by up to 0.04 between sessions, and 50 steps by
far less. A changed default, schedule, initialization or loss moves them by more.

After an intended change of the `tiny` numbers, write the file again and say why in the
commit: `python -m tests.integration.test_golden_loss` (from the repository root).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden_tiny.json"
SETTINGS = dict(preset="tiny", max_steps=50, batch_size=8, seq_len=64, eval_every=50, eval_windows=8,
                checkpoint_every=50, sample_prompt="", device="cpu")
TRAIN_TOLERANCE, VAL_TOLERANCE = 0.03, 0.02


def run_tiny(data_dir, out) -> dict:
    """The losses of 50 `tiny` steps: every training step's and the final validation loss."""
    from engram.train.loop import TrainConfig, train

    summary = train(out, TrainConfig(**SETTINGS), data_dir=data_dir, log=lambda *a: None, progress=False)
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"settings": SETTINGS, "train_loss": [round(r["loss"], 5) for r in records if r["kind"] == "train"],
            "val_loss": round(summary["final_val_loss"], 5)}


def test_tiny_preset_reproduces_its_golden_losses(small_dataset, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == SETTINGS, "the golden file was written with other settings: write it again"
    got = run_tiny(small_dataset, tmp_path / "run")
    diffs = [abs(a - b) for a, b in zip(got["train_loss"], golden["train_loss"])]
    assert len(got["train_loss"]) == len(golden["train_loss"]) == 50
    worst = max(range(50), key=lambda i: diffs[i])
    assert diffs[worst] <= TRAIN_TOLERANCE, (f"step {worst + 1}: loss {got['train_loss'][worst]:.4f}, golden "
                                             f"{golden['train_loss'][worst]:.4f} (tolerance {TRAIN_TOLERANCE})")
    assert got["val_loss"] == pytest.approx(golden["val_loss"], abs=VAL_TOLERANCE)
    assert got["train_loss"][-1] < got["train_loss"][0] - 1.0  # and it learns


if __name__ == "__main__":
    import tempfile

    from tests.integration.conftest import build_small_dataset

    with tempfile.TemporaryDirectory() as tmp:
        GOLDEN.parent.mkdir(exist_ok=True)
        data = build_small_dataset(Path(tmp))
        GOLDEN.write_text(json.dumps(run_tiny(data, Path(tmp) / "run"), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
