"""`EngramLMConfig`: a transformers config that carries an engram `ModelConfig` and its hash layout."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..config import ModelConfig
from ..hashing.layout import HashLayout

# transformers' names for the ModelConfig fields that tools read and tests set
MIRRORS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "n_layers",
           "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
           "intermediate_size": "mlp_hidden_size", "max_position_embeddings": "max_seq_len",
           "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta", "tie_word_embeddings": "tie_embeddings"}


def _mirror(name: str, field: str) -> property:
    """A transformers-named attribute that reads and writes the engram config's field, so the
    two can never disagree (`config.num_hidden_layers = 2` builds a 2-block model)."""

    def get(self):
        model = self.__dict__.get("engram_model")
        return self.__dict__.get(f"_{name}") if model is None else model.get(field)

    def set(self, value):
        model = self.__dict__.get("engram_model")
        if model is None:
            self.__dict__[f"_{name}"] = value
        else:
            model[field] = value

    return property(get, set, doc=f"`engram_model['{field}']`")


# Overlay names declared by any config in this process. vLLM validates a request's extra
# arguments in its front-end process, which holds the served config but no model: the
# plugin's overlay selector refuses an unknown name there (HTTP 400), not in a worker.
DECLARED_OVERLAY_NAMES: set[str] = set()


class EngramLMConfig(PretrainedConfig):
    """`engram_model`: `ModelConfig.to_dict()`; `hash_layout`: `HashLayout.to_dict()` (saved
    with the weights and checked against the model config on load). The usual transformers
    fields (vocab_size, hidden_size, num_hidden_layers, ...) are the model config's own fields
    under transformers' names: reading or setting one reads or sets `engram_model`.
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
        mirrored = {name: kwargs.pop(name) for name in list(kwargs) if name in MIRRORS}
        super().__init__(**kwargs)
        for name, value in mirrored.items():  # given explicitly: they win over engram_model
            setattr(self, name, value)

    @property
    def engram_overlays(self) -> dict[str, str]:
        """Named overlays a server loads at start ({name: folder}; `--hf-overrides`), which
        each request may select (docs/serving.md)."""
        return dict(self.__dict__.get("_engram_overlays") or {})

    @engram_overlays.setter
    def engram_overlays(self, value) -> None:
        from ..memory.overlay_mix import check_overlay_names

        named = check_overlay_names(value or {})
        self.__dict__["_engram_overlays"] = named
        DECLARED_OVERLAY_NAMES.update(named)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_engram_overlays", None)
        if self.engram_overlays:
            out["engram_overlays"] = self.engram_overlays
        for name in MIRRORS:
            out.pop(f"_{name}", None)
            out[name] = getattr(self, name)
        return out

    @property
    def model_config(self) -> ModelConfig:
        if self.engram_model is None:
            raise ValueError("this EngramLMConfig has no engram_model; build it with "
                             "EngramLMConfig(engram_model=model_config.to_dict(), hash_layout=...)")
        return ModelConfig.from_dict(self.engram_model)


for _name, _field in MIRRORS.items():
    setattr(EngramLMConfig, _name, _mirror(_name, _field))
