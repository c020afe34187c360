"""Serving Engram models on vLLM.

Installed with `pip install 'engram-torch[vllm]'`, the package registers itself with vLLM
through the `vllm.general_plugins` entry point: every vLLM process (the server, its engine
core and its workers) calls `register()`, which makes the `engram` config type known to
transformers and the `EngramForCausalLM` architecture known to vLLM. Then `vllm serve
FOLDER` and `vllm.LLM(FOLDER)` serve a folder written by `engram export-hf`
(docs/serving.md).
"""

from __future__ import annotations

ARCHITECTURE = "EngramForCausalLM"


def register() -> None:
    """The plugin entry point (cheap; safe to call more than once)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ..hf.config import EngramLMConfig

    AutoConfig.register(EngramLMConfig.model_type, EngramLMConfig, exist_ok=True)
    from .overlays import salt_prefix_cache_by_overlay

    salt_prefix_cache_by_overlay()  # the engine core builds requests: their cache salt names their overlays
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "engram.vllm_plugin.model:EngramForVLLM")
