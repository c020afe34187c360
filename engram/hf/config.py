"""`EngramLMConfig`: a transformers config that carries an engram `ModelConfig` and its hash layout."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..config import ModelConfig
from ..hashing.layout import HashLayout


class EngramLMConfig(PretrainedConfig):
    """`engram_model`: `ModelConfig.to_dict()`; `hash_layout`: `HashLayout.to_dict()` (saved
    with the weights and checked against the model config on load). The usual transformers
    fields (vocab_size, hidden_size, ...) mirror the model config for tools that read them.
    A config saved with old field names loads and is kept with today's (docs/names.md).

    `use_cache` (default True) is declared here: transformers 5 gives configs no default for
    it. The tokenizer's `bos/eos/pad_token_id` are kept as given (`export-hf` writes them)."""

    model_type = "engram"

    def __init__(self, engram_model: dict[str, Any] | None = None, hash_layout: dict[str, Any] | None = None,
                 use_cache: bool = True, **kwargs) -> None:
        self.use_cache = use_cache
        c = None if engram_model is None else ModelConfig.from_dict(engram_model)
        self.engram_model = None if c is None else c.to_dict()
        self.hash_layout = None if hash_layout is None else HashLayout.from_dict(hash_layout).to_dict()
        if c is not None:
            for key, value in (("vocab_size", c.vocab_size), ("hidden_size", c.hidden_size),
                               ("num_hidden_layers", c.n_layers), ("num_attention_heads", c.n_heads),
                               ("num_key_value_heads", c.n_kv_heads), ("max_position_embeddings", c.max_seq_len)):
                kwargs.setdefault(key, value)
            kwargs["tie_word_embeddings"] = c.tie_embeddings
        super().__init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        if self.engram_model is None:
            raise ValueError("this EngramLMConfig has no engram_model; build it with "
                             "EngramLMConfig(engram_model=model_config.to_dict(), hash_layout=...)")
        return ModelConfig.from_dict(self.engram_model)
