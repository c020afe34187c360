"""A run folder, and the one place that reads or writes it.

    RUN/run.json                 what the run is: its settings, model config, dataset
    RUN/checkpoints/step_N/      model files (or an adapter), optimizer state, trainer.json,
                                 checksums.json (sha256 of every other file, written last)
    RUN/metrics.jsonl, summary.json, loss_curve.png     what training measured

A checkpoint is written under a temporary name; every file and the folder are fsynced, then it
is renamed into place and the parent fsynced (engram.durable); older ones are deleted only
after that. A checkpoint whose checksums do not verify is reported and the previous one is
used. `Checkpoints` writes single-process checkpoints (safetensors + JSON) itself and sharded
ones through the DCP format that `engram.distributed.checkpoint` provides, so training,
retrofit, memory edits and distributed runs all write through one path. `open_run` opens a
run (or an exported transformers folder) for evaluation and serving.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file

from .durable import atomic_write_text, file_sha256, read_safetensors, replace_dir
from .hashing.layout import HashLayout
from .model.io import load_model, read_model_meta, write_model_files
from .model.transformer import EngramLM

_STEP_DIR = re.compile(r"^step_(\d{8})$")
RUN_JSON = "run.json"
HF_RUN_FILE = "engram_run.json"  # in an `engram export-hf` folder: the run's settings and dataset
DCP_DIR = "dcp"  # a distributed checkpoint's torch.distributed.checkpoint files


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not belong to this run."""


class RunError(ValueError):
    """A folder that is not the run asked for (no run.json, no usable checkpoint, no dataset)."""


def optimizer_payload(optimizers: list[torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], list[dict]]:
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


def restore_optimizer_payload(optimizers: list[torch.optim.Optimizer], tensors: dict[str, torch.Tensor],
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


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizers: list[torch.optim.Optimizer] | None, trainer_state: dict[str, Any], keep_last: int = 3,
                    *, weights: Callable[[torch.nn.Module, Path], None] = write_model_files,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write single-process checkpoint `step` atomically (the model's files by `weights`, the
    optimizer state and the torch RNG unless `optimizers` is None, trainer.json, and what
    `extra(folder)` adds), then delete all but the newest `keep_last`."""
    with staged_checkpoint(run_dir, step, keep_last) as tmp:
        weights(model, tmp)
        if optimizers is not None:
            tensors, meta = optimizer_payload(optimizers)
            tensors["rng.torch"] = torch.get_rng_state()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        if extra is not None:
            extra(tmp)
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
    sums = {str(f.relative_to(tmp)): file_sha256(f) for f in files}
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
        if file_sha256(f) != digest:
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
    """Load the optimizer state (and the torch RNG, when saved) of a checkpoint into optimizers
    built for the model `load_checkpoint` returned, in the same order as when it was saved."""
    tensors = read_safetensors(path / "optimizer.safetensors")
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors.pop("rng.torch"))
    restore_optimizer_payload(optimizers, tensors, json.loads((path / "optimizer.json").read_text()))


def is_distributed_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


class Checkpoints:
    """The checkpoints of one run: newest good, save, restore.

    Single-process checkpoints are written here (safetensors + JSON); a run on several ranks
    saves through `sharded`, the DCP format of `engram.distributed.checkpoint` (any object with
    `save(run_dir, step, model, optimizers, state, keep_last)` and `load(path, model,
    optimizers)`), which also restores a sharded checkpoint in one process. `weights` writes
    the model's files (default: the whole model; retrofit writes its adapter)."""

    def __init__(self, run_dir: str | os.PathLike, *, keep_last: int = 3, sharded=None,
                 weights: Callable[[torch.nn.Module, Path], None] = write_model_files):
        self.run_dir, self.keep_last, self.sharded, self.weights = Path(run_dir), keep_last, sharded, weights

    def latest_good(self, warn=print) -> Path | None:
        return latest_good_checkpoint(self.run_dir, warn=warn)

    def save(self, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer] | None,
             state: dict[str, Any], *, distributed: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
        """Checkpoint `step`; `optimizers=None` saves a model without training state (an
        edited run), `extra(folder)` writes more files into it before it is sealed."""
        if distributed:
            return self.sharded.save(self.run_dir, step, model, optimizers, state, keep_last=self.keep_last)
        return save_checkpoint(self.run_dir, step, model, optimizers, state, self.keep_last, weights=self.weights,
                               extra=extra)

    def restore(self, path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
        """Load the training state of checkpoint `path` into a model built for it (a
        single-process checkpoint's weights come with `load_checkpoint`; a sharded one's are
        loaded here, resharded for this world size) and return its trainer.json."""
        verify_checkpoint(path)
        if is_distributed_checkpoint(path):
            if self.sharded is None:
                raise CheckpointError(f"{path} is a distributed checkpoint; load it with engram.distributed")
            self.sharded.load(path, model, optimizers)
        else:
            restore_optimizers(path, optimizers)
        return json.loads((path / "trainer.json").read_text())


# ---------------------------------------------------------------------------- the run folder
def is_run(path: str | os.PathLike) -> bool:
    return (Path(path) / RUN_JSON).is_file()


def is_hf_folder(path: str | os.PathLike) -> bool:
    """A transformers folder of an EngramForCausalLM (`engram export-hf`, `save_pretrained`)."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") == "engram"
    except (OSError, ValueError):
        return False


class OutputError(RunError):
    """An output path that would destroy what the command did not create."""


def check_output(out: str | os.PathLike, *, sources: Sequence[str | os.PathLike] = (), what: str = "output",
                 own=None, overwrite: bool = False, resume: bool = False, may_hold: Sequence[str] = ()) -> Path:
    """Refuse, before anything is written, an output folder that would destroy what this
    command did not create (every command that writes calls this first):
    - the source itself, a folder inside a source, or one that contains a source;
    - an existing run (run.json), unless `resume`;
    - a non-empty folder: allowed only when `own(out)` says it is this command's own earlier
      output and `overwrite` is given, or it holds nothing but `may_hold` entries.
    Output is then staged and renamed (`durable.staged_dir`), so a failed command leaves no
    half-written folder. Returns the resolved path."""
    path = Path(out)
    real = path.resolve()
    for source in sources:
        src = Path(source).resolve()
        if real == src:
            raise OutputError(f"--out {path} is the source {source}; writing there would replace it: "
                              "give another --out")
        if src in real.parents:
            raise OutputError(f"--out {path} is inside the source {source}; writing there would change it: give "
                              "a folder outside it")
        if real in src.parents:
            raise OutputError(f"--out {path} contains the source {source}; replacing it would delete the source: "
                              "give another --out")
    if path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; give a folder")
    if not path.is_dir() or resume:
        return real
    if is_run(path):
        raise OutputError(f"--out {path} is an existing run ({RUN_JSON}); give --resume to continue it, "
                          "or another --out")
    entries = [e.name for e in path.iterdir() if e.name not in may_hold]
    if entries:
        if own is None:
            raise OutputError(f"--out {path} is not empty ({entries[0]!r} among its {len(entries)} entries); the "
                              f"{what} goes to a new or empty folder")
        if not own(path):
            raise OutputError(f"--out {path} is a non-empty folder that is not an earlier {what} ({entries[0]!r} among "
                              f"its {len(entries)} entries); give a new or empty folder")
        if not overwrite:
            raise OutputError(f"--out {path} holds an earlier {what}; give --overwrite to replace it, or another --out")
    return real


def read_run(path: str | os.PathLike) -> dict[str, Any]:
    """run.json of a run folder (RunError when the folder is not a run)."""
    path = Path(path)
    if not is_run(path):
        raise RunError(f"{path} is not a training run folder (no {RUN_JSON}); give the --out folder of engram train")
    try:
        return json.loads((path / RUN_JSON).read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path / RUN_JSON} is not valid JSON ({e}); the run folder is damaged") from None


def write_run(path: str | os.PathLike, info: dict[str, Any]) -> None:
    atomic_write_text(Path(path) / RUN_JSON, json.dumps(info, indent=1))


def newest_checkpoint(run: str | os.PathLike, warn=print) -> Path:
    """The newest checkpoint of a run that verifies (each bad one is reported through `warn`)."""
    read_run(run)
    ckpt = latest_good_checkpoint(run, warn=warn)
    if ckpt is None:
        raise RunError(f"{run} has no usable checkpoint yet")
    return ckpt


def run_data(info: dict[str, Any], data: str | os.PathLike | None = None):
    """The dataset a run reads: `data`, else the one it trained on."""
    from .data.dataset import PreparedData

    if not (data or info.get("data_dir")):
        raise RunError("this model folder names no dataset; pass --data DIR (a folder from engram data build)")
    return PreparedData.open(data or info["data_dir"])


@dataclass
class OpenedRun:
    """A model ready to evaluate or serve, with what it came from."""
    model: EngramLM
    info: dict[str, Any]  # run.json (an exported folder's engram_run.json)
    checkpoint: Path

    def __iter__(self):  # model, info, checkpoint = open_run(...)
        return iter((self.model, self.info, self.checkpoint))

    def data(self, override: str | os.PathLike | None = None):
        return run_data(self.info, override)


def disk_tables(folder: str | os.PathLike, cache_rows: int | None = None, release_pages: bool = True):
    """A `load_model` table factory serving each Engram layer from the folder `engram offload`
    wrote (plain or quantized rows), optionally behind a hot-row cache. `release_pages`: unmap
    the touched pages after each gather, so the process's RSS stays bounded by its cache (the
    page cache keeps them); off, the mapped pages stay (shared by every process that maps the
    file) and a gather faults no page in again."""
    from .memory import CachedTable, DiskTable, QuantizedTable
    from .memory.quantized import quantization_of

    def factory(layer, sizes, dim):
        stem = Path(folder) / f"layer{layer}"
        if not Path(str(stem) + ".json").is_file():
            raise RunError(f"{folder} has no table for Engram layer {layer}; write the tables with engram offload")
        if quantization_of(stem):  # codes + scales, dequantized per gathered row
            table = QuantizedTable.open(stem, release_every=1 if release_pages else None)
        else:
            table = DiskTable.open(stem, verify=False, release_every=1 if release_pages else None)
        return CachedTable(table, capacity_rows=cache_rows) if cache_rows else table

    return factory


def offload_manifest(source: str | os.PathLike, dtype: str) -> dict[str, Any]:
    """What `engram offload` records of the model its tables came from: its identity and hash
    layout (every field, multipliers and primes included)."""
    layout = read_model_meta(source)[1]
    return {"format": "engram-offload/1", **checkpoint_identity(source),
            "hash_layout": None if layout is None else layout.to_dict(), "dtype": dtype}


def check_tables_belong(tables: str | os.PathLike, ckpt: str | os.PathLike, layout: HashLayout | None,
                        warn=print) -> None:
    """Refuse, by name, tables offloaded from another model: another checkpoint's weights, or
    another hash layout. A folder without offload.json (written before it existed) is warned of."""
    from .memory.convert import OFFLOAD_JSON

    path = Path(tables) / OFFLOAD_JSON
    if not path.is_file():
        warn(f"{tables} does not say which model its tables came from (no {OFFLOAD_JSON}; offload them again to "
             "have it checked)")
        return
    try:
        theirs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path} is not valid JSON ({e}); offload the tables again") from None
    mine = checkpoint_identity(ckpt)
    a, b = theirs.get("weights_sha256"), mine.get("weights_sha256")
    if a and b and a != b:
        raise RunError(f"{tables} holds tables offloaded from {theirs.get('checkpoint')} (weights sha256 {a[:12]}), "
                       f"not from this model's {mine['checkpoint']} ({b[:12]}); offload this model's tables "
                       "(engram offload), or serve the model they came from")
    if layout is not None and theirs.get("hash_layout"):
        try:
            HashLayout.from_dict(theirs["hash_layout"]).check_matches(layout, "the model's")
        except ValueError as e:
            raise RunError(f"{tables} was offloaded for another hash layout: {e}") from None


def checkpoint_identity(ckpt: str | os.PathLike) -> dict[str, Any]:
    """What names a checkpoint's weights: its path and the sha256 of its weights file (from its
    checksums.json, not recomputed). A folder from `engram export-hf` names the checkpoint it
    was exported from (engram_run.json); None where nothing is recorded."""
    ckpt = Path(ckpt)
    if is_hf_folder(ckpt):
        info_file = ckpt / HF_RUN_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        return {"checkpoint": info.get("source", str(ckpt)), "weights_sha256": info.get("source_weights_sha256")}
    sums_file = ckpt / "checksums.json"
    sums = json.loads(sums_file.read_text()) if sums_file.is_file() else {}
    return {"checkpoint": str(ckpt), "weights_sha256": sums.get("model.safetensors")}


def open_run(path: str | os.PathLike, *, tables: str | os.PathLike | None = None, cache_rows: int | None = None,
             device: str | torch.device | None = "cpu", warn=print, overlays: Sequence[str | os.PathLike] = (),
             force_overlays: bool = False) -> OpenedRun:
    """The newest good checkpoint of a run (or a transformers folder from `engram export-hf`)
    as a model in eval mode on `device` ("auto": a GPU when there is one). With `tables` (a
    folder from `engram offload`) the Engram tables are served from disk, never loaded.
    `overlays` (folders from `engram memory forget|write --overlay`) are stacked over the
    tables in the order given (`engram.memory.overlay`)."""
    from .device import resolve_device

    path = Path(path)
    if is_hf_folder(path):
        ckpt, info_file = path, path / HF_RUN_FILE
        info = json.loads(info_file.read_text()) if info_file.is_file() else {"train": {}, "data_dir": None}
    else:
        info, ckpt = read_run(path), newest_checkpoint(path, warn=warn)
    if cache_rows and not tables:
        raise RunError("--cache-rows needs --tables (a folder made by engram offload)")
    if not isinstance(device, torch.device):
        device = resolve_device(device or "auto")
    model = load_model(ckpt, device=device, table_factory=disk_tables(tables, cache_rows) if tables else None)
    if tables:
        check_tables_belong(tables, ckpt, model.layout, warn=warn)
    if overlays:
        from .memory.overlay import Overlay, apply_overlays

        apply_overlays(model, [Overlay.load(o) for o in overlays], parent=checkpoint_identity(ckpt),
                       force=force_overlays)
    return OpenedRun(model.eval(), info, ckpt)


# ---------------------------------------------------------------------------- resuming
def config_diff(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: saved -> now' for every field that differs (nested configs key by key)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a) != json.dumps(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def check_same_run(run: str | os.PathLike, *, settings_key: str, settings: dict, defaults: dict,
                   may_change: tuple[str, ...] = (), model: dict | None = None, data: str | None = None,
                   same: dict[str, Any] | None = None, model_may_change: tuple[str, ...] = ()) -> None:
    """A resumed run must keep its settings, model and dataset: anything else would silently
    train a different model from the checkpoint's weights. `settings` are compared with
    run.json's `settings_key` section (fields added since the run started read as `defaults`;
    `may_change` do not change the numbers of the steps taken); `model`: the model config as
    a dict, whose `model_may_change` fields (dotted) may differ (an initialization: the weights
    come from the checkpoint); `data`: the dataset's fingerprint; `same`: other run.json
    entries that must not change (a retrofit's base model and data folder)."""
    run = Path(run)
    info = read_run(run)
    if "parent" in info:
        raise RunError(f"{run} is an edited copy of {info['parent']['run']} (engram memory forget/write): it has "
                       "no optimizer state to resume from; train the parent run, or start a new run")
    saved = {**defaults, **info.get(settings_key, {})}
    diff = config_diff({k: v for k, v in saved.items() if k not in may_change},
                       {k: v for k, v in settings.items() if k not in may_change})
    if diff:
        may = f" (only {', '.join('--' + k.replace('_', '-') for k in may_change)} may change)" if may_change else ""
        raise RunError(f"{run} was started with other settings ({'; '.join(diff)}); resume with the same ones{may}")
    for key, value in (same or {}).items():
        if info.get(key) != value:
            raise RunError(f"{run} was started with another {key} ({info.get(key)}, now {value}); resume with the "
                           "same one, or start a new run in another folder")
    if model is not None:
        from .config import ModelConfig

        diff = [d for d in config_diff(ModelConfig.from_dict(info["model"]).to_dict(), model)
                if d.split(":")[0] not in model_may_change]
        if diff:
            raise RunError(f"{run} was trained with another model config ({'; '.join(diff[:5])}); resume with the "
                           "same --preset or --config")
    if data is not None and "data" in info and info["data"] != data:
        raise RunError(f"{run} was trained on another dataset ({info.get('data_dir')}: another tokenizer or other "
                       f"token files); resume with --data {info.get('data_dir')}")
