"""Training checkpoints that never lose work.

A checkpoint is a folder `checkpoints/step_XXXXXXXX/` holding the model folder files
(config.json, hash_layout.json, model.safetensors), optimizer.safetensors (every optimizer
state tensor) with optimizer.json (hyper-parameters and scalar state), trainer.json (step,
RNG, data position) and, last, checksums.json (sha256 of every other file). It is written
under a temporary name, every file and the folder are fsynced, then it is renamed into place
and the parent fsynced (engram.durable); older ones are deleted only after that. On resume a
checkpoint whose checksums do not verify is reported and the previous one is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..durable import replace_dir
from ..model.io import load_model, write_model_files
from ..model.transformer import EngramLM

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not belong to this run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_payload(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Tensors to safetensors, everything else (groups, scalar state) to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    meta = []
    for i, opt in enumerate(optimizers):
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for pid, state in sd["state"].items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"opt{i}.{pid}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[key] = value
        meta.append({"type": type(opt).__name__, "param_groups": sd["param_groups"], "scalars": scalars,
                     "tensor_state": {str(pid): [k for k, v in s.items() if isinstance(v, torch.Tensor)]
                                      for pid, s in sd["state"].items()}})
    return tensors, meta


def _restore_optimizers(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
                        meta: list[dict]) -> None:
    if len(meta) != len(optimizers) or any(m["type"] != type(o).__name__ for m, o in zip(meta, optimizers)):
        raise CheckpointError(
            f"checkpoint holds optimizers {[m['type'] for m in meta]}, this run builds "
            f"{[type(o).__name__ for o in optimizers]}; resume with the same --table-optimizer"
        )
    for i, (opt, m) in enumerate(zip(optimizers, meta)):
        state: dict[int, dict[str, Any]] = {}
        for pid, keys in m["tensor_state"].items():
            state[int(pid)] = {k: tensors[f"opt{i}.{pid}.{k}"] for k in keys}
        for pid, scalars in m["scalars"].items():
            state.setdefault(int(pid), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": m["param_groups"]})


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: EngramLM,
                    optimizers: list[torch.optim.Optimizer], trainer_state: dict[str, Any],
                    keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last`."""
    with staged_checkpoint(run_dir, step, keep_last) as tmp:
        write_model_files(model, tmp)
        tensors, meta = _optimizer_payload(optimizers)
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def new_checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary folder beside the run's checkpoints to write checkpoint `step` into."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=f".step_{step:08d}.", suffix=".tmp"))


def finish_checkpoint(tmp: Path, run_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Seal a written checkpoint: checksums.json over every file (subfolders included), fsync
    every file and the folder, rename into place, fsync checkpoints/ (`replace_dir`); then
    delete all but the newest `keep_last`."""
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    sums = {str(f.relative_to(tmp)): _sha256(f) for f in files}
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    replace_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def staged_checkpoint(run_dir: str | os.PathLike, step: int, keep_last: int):
    """`with staged_checkpoint(run, step, keep) as tmp:` write the files into `tmp`; on leaving
    the block the checkpoint is sealed (`finish_checkpoint`), or, on an error, `tmp` is removed."""
    tmp = new_checkpoint_dir(run_dir, step)
    try:
        yield tmp
        finish_checkpoint(tmp, run_dir, step, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless every file matches checksums.json."""
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        raise CheckpointError(f"{path}: checksums.json is missing (the write did not finish)")
    try:
        sums = json.loads(sums_file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: checksums.json is corrupt") from None
    for name, digest in sums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(f) != digest:
            raise CheckpointError(f"{path}: {name} does not match its checksum (corrupt or truncated)")


def latest_good_checkpoint(run_dir: str | os.PathLike, warn=print) -> Path | None:
    """The newest checkpoint that verifies; each bad one is reported through `warn`."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warn(f"warning: skipping checkpoint: {e}")
    return None


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[EngramLM, dict[str, Any]]:
    """The model and trainer state of a checkpoint (verified first)."""
    verify_checkpoint(path)
    return load_model(path, device=device), json.loads((path / "trainer.json").read_text())


def restore_optimizers(path: Path, optimizers: list[torch.optim.Optimizer]) -> None:
    """Load the optimizer state (and the torch RNG) of a checkpoint into optimizers built for
    the model `load_checkpoint` returned, in the same order as when it was saved."""
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("rng.torch"))
    _restore_optimizers(optimizers, tensors, json.loads((path / "optimizer.json").read_text()))
