"""Metrics a person can plot: JSONL (one record per line), TensorBoard event files, a PNG.

On resume the JSONL is cut back to the checkpoint's step and TensorBoard purges the steps
after it, so a resumed run's metrics equal an uninterrupted run's. A kill can cut the last
line mid-write; reading drops such a torn last line with a warning and keeps the rest.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from ..durable import atomic_write_text


class MetricsLogger:
    def __init__(self, run_dir: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in self.read() if line.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=None if resume_step is None
                                     else resume_step + 1)
        except ImportError:  # TensorBoard files are a convenience; the JSONL is the record
            pass

    def read(self) -> list[dict[str, Any]]:
        """Every record; a torn last line (cut by a kill mid-write) is dropped with a warning.
        A bad line anywhere else is corruption, not a torn write, and raises."""
        if not self.path.is_file():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if i < len(lines) - 1:
                    raise ValueError(f"{self.path} line {i + 1} is not JSON ({e}); the file is corrupt: "
                                     "repair or delete that line") from None
                warnings.warn(f"{self.path}: dropped a torn last line (a write cut by a kill): {line[:60]!r}",
                              stacklevel=2)
        return records

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_losses(records: list[dict[str, Any]], out_png: str | Path, title: str = "") -> Path:
    """Training loss (thin) and validation loss (markers) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
