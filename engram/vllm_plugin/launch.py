"""The command line that starts vLLM's OpenAI-compatible server on an exported Engram folder
(what `engram serve` runs). Importing this module does not import vLLM."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

INSTALL_HINT = ("pip install 'engram-torch[vllm]' in a venv of its own (vLLM pins transformers < 5.20), then "
                "pip uninstall -y torchvision torchaudio torchcodec; docs/serving.md")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def server_command(folder: str | os.PathLike, *, name: str | None = None, host: str | None = None,
                   port: int | None = None, dtype: str = "auto", tables: str | os.PathLike | None = None,
                   cache_rows: int | None = None, overlays: dict[str, str] | None = None,
                   extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server` (vllm serve) on `folder`. `tables`: serve
    the Engram tables from a folder written by `engram offload` (memory-mapped, plain or
    int8/fp8), behind `cache_rows` hot rows; `overlays`: {name: folder} that requests may
    select (vllm_xargs engram_overlays); both passed to the plugin as hf-overrides."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
           "--served-model-name", name or Path(folder).name, "--dtype", dtype]
    if host:
        cmd += ["--host", host]
    if port:
        cmd += ["--port", str(port)]
    overrides = {}
    if tables:
        overrides["engram_tables"] = str(Path(tables).resolve())
    if cache_rows:
        overrides["engram_cache_rows"] = int(cache_rows)
    if overlays:
        overrides["engram_overlays"] = {name: str(Path(d).resolve()) for name, d in overlays.items()}
    if overrides:
        cmd += ["--hf-overrides", json.dumps(overrides)]
    return cmd + list(extra)
