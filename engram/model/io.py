"""Save and load an EngramLM: a folder with config.json, hash_layout.json, model.safetensors.

Everything is written under a temporary name in the same parent folder, fsynced and renamed
into place (engram.durable), so neither a crash nor a power cut leaves a half-written model
where a good one was. Loading builds the model on the meta device and assigns the saved
tensors, so nothing is initialized only to be overwritten and peak memory stays ~1x the model.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..durable import staged_dir
from ..hashing.layout import HashLayout
from .transformer import EngramLM

FORMAT_VERSION = 1
_TABLE_KEY = re.compile(r"\.engram\.table\.")


def write_model_files(model: EngramLM, folder: str | os.PathLike, *, weights: bool = True) -> None:
    """config.json, hash_layout.json and (with `weights`) model.safetensors into an existing
    folder (not fsynced). Distributed checkpoints keep their weights in DCP files instead."""
    folder = Path(folder)
    config = {"format_version": FORMAT_VERSION, "model": model.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if model.layout is not None:
        model.layout.save(folder / "hash_layout.json")
    if not weights:
        return
    # contiguous, untied copies (safetensors refuses shared storage)
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
               if not (model.config.tie_embeddings and k == "lm_head.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "engram-torch"})


def save_model(model: EngramLM, path: str | os.PathLike) -> Path:
    """Write the model folder atomically and durably (replacing an existing folder at `path`)."""
    path = Path(path)
    with staged_dir(path) as tmp:
        write_model_files(model, tmp)
    return path


def read_model_meta(path: str | os.PathLike) -> tuple[ModelConfig, HashLayout | None, bool]:
    """(config, hash layout checked against it, whether it is a transformers folder) of a model
    folder: ours (config.json + hash_layout.json) or `EngramForCausalLM`'s (both in config.json)."""
    path = Path(path)
    try:
        meta = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({e}); the folder may be corrupt") from None
    hf = meta.get("model_type") == "engram" and "engram_model" in meta  # `engram export-hf` / save_pretrained
    if not hf and meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: model format {meta.get('format_version')!r} is not supported "
                         f"(this engram-torch reads {FORMAT_VERSION})")
    config = ModelConfig.from_dict(meta["engram_model"] if hf else meta["model"])
    layout = None
    if config.engram is not None and hf:
        if not meta.get("hash_layout"):
            raise ValueError(f"{path}/config.json has no hash_layout; without it the table rows cannot be "
                             "addressed as they were in training")
        layout = HashLayout.from_dict(meta["hash_layout"])
        layout.check_matches(config.engram, f"{path}/config.json")
    elif config.engram is not None:
        if not (path / "hash_layout.json").is_file():
            raise FileNotFoundError(f"{path}: hash_layout.json is missing; without it the table rows "
                                    "cannot be addressed as they were in training")
        layout = HashLayout.load(path / "hash_layout.json", expect=config.engram)
    return config, layout, hf


def load_model(path: str | os.PathLike, *, device: torch.device | str | None = None,
               table_factory: Callable[[int, tuple[int, ...], int], nn.Module] | None = None) -> EngramLM:
    """Rebuild the model from its folder (ours, a distributed checkpoint's, or a transformers
    folder of `EngramForCausalLM`); the saved hash layout is checked against the config.

    With `table_factory(layer_id, table_sizes, embedding_dim) -> MemoryTable`, the Engram tables
    are not read from model.safetensors at all (only the other tensors are): each layer is
    served by the table the factory returns (e.g. a disk table), so memory stays bounded.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir():
        raise FileNotFoundError(f"{path} is missing but {old} is there: a save was cut between its two renames; "
                                f"rename {old.name} back to {path.name}")
    sharded = (path / "dcp" / ".metadata").is_file()  # a distributed run's checkpoint
    for name in ("config.json",) if sharded else ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an engram-torch model folder: {name} is missing")
    config, layout, hf = read_model_meta(path)
    device = torch.device(device if device is not None else "cpu")
    keep = (lambda k: True) if table_factory is None else (lambda k: not _TABLE_KEY.search(k))
    if sharded:
        tensors = _read_distributed(path / "dcp", device, keep)
    else:
        try:  # on the CPU safetensors maps the file: tensors are read lazily, never copied twice
            with safe_open(str(path / "model.safetensors"), framework="pt", device=str(device)) as f:
                prefix = "model." if hf else ""  # EngramForCausalLM keeps the EngramLM as `.model`
                tensors = {k[len(prefix):]: f.get_tensor(k) for k in f.keys()
                           if k.startswith(prefix) and keep(k[len(prefix):])}
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ValueError(f"{path / 'model.safetensors'} cannot be read ({e}); the file may be truncated") from None
    compression = tensors["compression"].cpu().numpy() if "compression" in tensors else None
    model = EngramLM(config, compression=compression, layout=layout, device="meta")
    # Assign the loaded tensors in place of the meta ones: no random init, no second copy.
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    not_saved = {"lm_head.weight"} if config.tie_embeddings else set()
    if table_factory is not None:
        not_saved |= {k for k in missing if _TABLE_KEY.search(k)}
    missing = [k for k in missing if k not in not_saved]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_embeddings:  # assign made embed.weight a new Parameter: tie the head to it again
        model.lm_head.weight = model.embed.weight
    if table_factory is not None:
        for layer in model.engram_layers:
            meta = model.blocks[layer].engram.table  # never materialized; set_table checks sizes against it
            table = table_factory(layer, meta.table_sizes, meta.embedding_dim)
            model.set_table(layer, table.to(device))  # offsets on the compute device; rows stay where they are
    _materialize_unsaved_buffers(model, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{path}: {left[:5]} were neither saved nor rebuilt; the folder does not match "
                         "this engram-torch's model")
    return model


def _read_distributed(folder: Path, device: torch.device, keep) -> dict[str, torch.Tensor]:
    """The model's tensors of a distributed checkpoint (torch.distributed.checkpoint), whole,
    in this process: any number of ranks wrote them; no process group is needed to read."""
    import torch.distributed.checkpoint as dcp

    try:
        reader = dcp.FileSystemReader(str(folder))
        saved = reader.read_metadata().state_dict_metadata
        tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device=device) for k, m in saved.items()
                   if k.startswith("model.") and keep(k[len("model."):])}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as e:
        raise ValueError(f"{folder} cannot be read as a distributed checkpoint ({type(e).__name__}: {e}); "
                         "it may be incomplete or corrupt") from None
    return {k[len("model."):]: v for k, v in tensors.items()}


def _materialize_unsaved_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers are not in the file: allocate them on `device`, zeroed (counters
    such as MoE load counts start at zero), then let their module fill them (`reset_buffers`,
    e.g. a table's offsets and sizes)."""
    for module in model.modules():
        meta = [name for name, b in module._buffers.items() if b is not None and b.is_meta]
        for name in meta:
            b = module._buffers[name]
            module._buffers[name] = torch.zeros(b.shape, dtype=b.dtype, device=device)
        if meta and hasattr(module, "reset_buffers"):
            module.reset_buffers()
