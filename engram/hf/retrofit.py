"""Engram retrofitted into a pretrained transformers causal LM (Llama, Qwen2, Mistral, GPT-2).

    add_engram(model, layers=[2, 5], tokenizer=tok)   # in place; the model starts bit-identical
    ... train (adapter mode: only Engram learns) ...
    save_engram_adapter(model, "adapter/"); load_engram_adapter(other, "adapter/")
    remove_engram(model)                              # the base model again

Hooks, no edited model code: a pre-hook on the base model hashes the call's ids (continuing
the n-gram history kept in the model's own cache), and a pre-hook on each chosen decoder layer
adds Engram's output to the hidden states entering it. What decoding needs to continue exactly
(the last N-1 compressed ids, each Engram layer's short-conv history) is an extra layer of the
transformers cache (`EngramCacheLayer`), so the cache carries it through `generate`, beam
search reorders it with the keys and values, and cached decoding equals the full forward.
(Hashing only the ids of the current call would see (pad, pad, t) at every decoding step and
restart the conv from zeros: cached generation would then differ from the full forward.)
"""

from __future__ import annotations

import functools
import json
import types
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import EngramConfig
from ..durable import atomic_write_text, read_safetensors
from ..hashing.compression import CompressedTokenizer
from ..hashing.ngram import NgramHasher
from ..memory.engram import Engram, ShortConvState
from .cache import BatchMapped

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "engram_adapter.json", "engram_adapter.safetensors"


class EngramCacheLayer(BatchMapped):
    """The Engram part of a decoding state, kept as one more layer of a transformers cache:
    the n-gram history [B, N-1] and each Engram layer's conv history [B, ctx, D]. Reordered,
    selected and repeated along the batch with the attention layers."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    is_initialized = True

    def __init__(self) -> None:
        self.ngram_history: torch.Tensor | None = None
        self.conv: dict[int, ShortConvState] = {}

    def _map_batch(self, fn) -> None:
        if self.ngram_history is not None:
            self.ngram_history = fn(self.ngram_history)
        for state in self.conv.values():
            if state.history is not None:
                state.history = fn(state.history)

    def reset(self) -> None:
        self.ngram_history, self.conv = None, {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("the Engram n-gram and conv histories cannot be rewound; assisted and "
                                      "speculative decoding are not supported with a retrofitted Engram yet")

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass


def _decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, int, int]:
    """(base model, its decoder layers, hidden size, vocabulary size) of a supported causal LM."""
    config = getattr(model, "config", None)
    base = getattr(model, "model", None) if getattr(model, "model", None) is not None else getattr(model, "transformer",
                                                                                                   None)
    layers = getattr(base, "layers", None) if base is not None else None
    if layers is None and base is not None:
        layers = getattr(base, "h", None)  # GPT-2
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not isinstance(layers, nn.ModuleList) or hidden is None or getattr(config, "is_encoder_decoder", True):
        raise ValueError(f"add_engram supports decoder-only causal LMs shaped like Llama, Qwen2, Mistral (model.model."
                         f"layers) or GPT-2 (model.transformer.h); {type(model).__name__} is not one of them")
    return base, layers, int(hidden), int(config.vocab_size)


class EngramAdapter(nn.Module):
    """The retrofit's own parameters and settings, held by the model as `model.engram_adapter`."""

    def __init__(self, config: EngramConfig, compression: CompressedTokenizer | None, vocab_size: int,
                 hidden_size: int) -> None:
        super().__init__()
        self.config, self.hidden_size = config, hidden_size
        table = compression.lookup_table if compression is not None else torch.arange(vocab_size).numpy()
        self.register_buffer("compression", torch.as_tensor(table, dtype=torch.int64))
        self.hasher = NgramHasher.from_config(
            config, vocab_fingerprint=compression.fingerprint if compression is not None else None)
        self.engrams = nn.ModuleDict({  # one residual stream (M = 1): the base model's
            str(layer): Engram(config, self.hasher.table_sizes[layer], hidden_size=hidden_size, n_streams=1,
                               layer_id=layer)
            for layer in config.layer_ids})
        self.hooks: list[Any] = []

    def zero_values(self) -> None:
        """Zero the value projection (the first D rows of each fused projection): Engram adds
        exactly 0 until it is trained, so the model starts bit-identical to the base."""
        with torch.no_grad():
            for engram in self.engrams.values():
                engram.proj.weight[:engram.hidden_size].zero_()
                if engram.proj.bias is not None:
                    engram.proj.bias[:engram.hidden_size].zero_()


def _find_state(cache) -> EngramCacheLayer | None:
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, EngramCacheLayer):
            return layer
    return None


class _Hooks:
    """What the hooks share: the model (weakly) and the current call's rows, valid mask and
    decoding state. The adapter is looked up on the model at each call, so a wrapper that
    swaps in a trained copy (PEFT's `modules_to_save`) is the one that runs."""

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)
        self.pending: dict[str, Any] = {}

    def adapter(self) -> "EngramAdapter":
        return self.model().engram_adapter  # PEFT's wrapper answers with its active copy's attributes

    def __deepcopy__(self, memo: dict) -> "_Hooks":
        """A deep copy of the model gets hooks that run the copy's adapter (the model is in
        `memo` by the time its hooks are copied)."""
        model = self.model()
        return _Hooks(memo.get(id(model), model))

    def base_pre(self, module, args, kwargs):
        """Before the base model: hash this call's ids, continuing the cache's n-gram history."""
        adapter = self.adapter()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a model with Engram looks its memory up by token ids: pass input_ids "
                             "(inputs_embeds alone cannot be hashed)")
        B, S = input_ids.shape
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        valid = None
        if mask is not None and mask.dim() == 2:
            valid = mask[:, -S:].to(torch.bool)
            if bool(valid.all()):
                valid = None
        cids = adapter.compression.to(input_ids.device)[input_ids]
        if valid is not None:
            cids = torch.where(valid, cids, adapter.config.pad_id)  # padding reads as "before the start"
        state = _find_state(cache)
        if state is None:
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError("this cache was filled without Engram (it holds no n-gram or conv history); "
                                 "start decoding again with the Engram model")
            # A fresh state every call without one: if the base creates a cache in this call, the
            # state joins it afterwards (the post-hook), so the next call continues from it.
            state = EngramCacheLayer()
        history = state.ngram_history if state.ngram_history is not None else \
            adapter.hasher.initial_history(B, input_ids.device)
        rows, state.ngram_history = adapter.hasher.hash_step(history, cids, check=False)
        self.pending = {"rows": rows, "valid": valid, "state": state, "engrams": adapter.engrams}
        return args, kwargs

    def base_post(self, module, args, kwargs, output):
        """After the base model: the Engram state joins a cache the call created."""
        state = self.pending.get("state")
        cache = getattr(output, "cache", None)
        if cache is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if state is not None and cache is not None and _find_state(cache) is None:
            cache.layers.append(state)  # after the attention layers exist (DynamicCache makes them lazily)
        self.pending = {}
        return output

    def layer_pre(self, layer: int, module, args, kwargs):
        """Before decoder layer `layer`: add its Engram output to the hidden states."""
        pending = self.pending
        if not pending:
            raise RuntimeError("an Engram decoder layer ran without its model's forward (no row ids); call the "
                               "whole model, not a decoder layer alone")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        conv = pending["state"].conv.setdefault(layer, ShortConvState())
        out = pending["engrams"][str(layer)](hidden, pending["rows"][layer], conv_state=conv, valid_BT=pending["valid"])
        hidden = hidden + out.to(hidden.dtype)
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = hidden
        else:
            args = (hidden, *args[1:])
        return args, kwargs


def add_engram(model: nn.Module, *, layers: Sequence[int], tokenizer: Any = None, config: EngramConfig | None = None,
               rows_per_head: int | None = None, n_head_per_ngram: int = 8, n_embed_per_ngram: int = 256,
               max_ngram_size: int = 3, mode: str = "adapter", seed: int = 0,
               table_init_std: float = 1.0) -> nn.Module:
    """Add Engram before the decoder layers `layers` (0-based) of a causal LM, in place, and
    return the model (`model = add_engram(model, ...)`, as with PEFT); the Engram parameters
    are `model.engram_adapter`.

    `tokenizer` (a transformers or tokenizers tokenizer) gives the compression (docs/paper.md step 1);
    without it the raw ids are hashed. `config` overrides everything else; by default the
    tables hold `rows_per_head` rows (default 5x the vocabulary, then the next primes) per head.
    The model's outputs are unchanged until trained, either way Engram can start:
    - `table_init_std=1` (default): rows N(0, 1) and the value projection at zero;
    - `table_init_std=0`: zero rows (what our own training found better, docs/results.md) and
      the projection at its usual init, so a row's first gradient is not zero.
    `mode`: "adapter" freezes the base model (only Engram trains), "full" trains everything.
    """
    if hasattr(model, "engram_adapter"):
        raise ValueError("this model already has Engram; remove_engram(model) first")
    if mode not in ("adapter", "full"):
        raise ValueError(f"mode must be 'adapter' (train only Engram) or 'full', got {mode!r}")
    base, decoder_layers, hidden, vocab = _decoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(decoder_layers)]
    if not layers or bad:
        raise ValueError(f"layers must be decoder layer indices in [0, {len(decoder_layers)}), got {list(layers)}")
    compression = CompressedTokenizer.from_tokenizer(tokenizer) if tokenizer is not None else None
    if compression is not None and len(compression.lookup_table) != vocab:
        raise ValueError(f"the tokenizer has {len(compression.lookup_table)} ids but the model's vocabulary is {vocab}")
    if config is None:
        compressed = len(compression) if compression is not None else vocab
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        pad = int(compression.lookup_table[pad]) if (compression is not None and pad is not None) else 0
        rows = rows_per_head or 5 * compressed
        config = EngramConfig(compressed_vocab_size=compressed, pad_id=pad, layer_ids=tuple(sorted(layers)),
                              rows_per_head=(rows,) * (max_ngram_size - 1), max_ngram_size=max_ngram_size,
                              n_head_per_ngram=n_head_per_ngram, n_embed_per_ngram=n_embed_per_ngram, seed=seed,
                              table_init_std=table_init_std)
    param = next(p for p in model.parameters() if p.is_floating_point())
    adapter = EngramAdapter(config, compression, vocab, hidden).to(param.device, param.dtype)  # the model's own dtype
    if config.table_init_std != 0:  # zero rows already make Engram add exactly 0
        adapter.zero_values()
    if mode == "adapter":
        for p in model.parameters():
            p.requires_grad_(False)
    model.engram_adapter = adapter  # a submodule: moved, saved and counted with the model
    hooks = _Hooks(model)
    adapter.hooks.append(base.register_forward_pre_hook(hooks.base_pre, with_kwargs=True))
    adapter.hooks.append(base.register_forward_hook(hooks.base_post, with_kwargs=True))
    for layer in config.layer_ids:  # bound methods, not closures: a deep copy of the model copies them
        adapter.hooks.append(decoder_layers[layer].register_forward_pre_hook(functools.partial(hooks.layer_pre, layer),
                                                                             with_kwargs=True))
    if hasattr(model, "save_pretrained"):  # a bound method: a deep copy of the model saves itself
        model.save_pretrained = types.MethodType(_save_pretrained_keeping_engram, model)
    return model


def _save_pretrained_keeping_engram(model: nn.Module, save_directory, *args, state_dict=None, **kwargs):
    """The model's `save_pretrained` (bound to it by `add_engram`), which would write the
    adapter's weights where the base class's `from_pretrained` drops them, made to keep them:
    the base weights as transformers writes them, the adapter beside them
    (`save_engram_adapter`), restored after `from_pretrained` by `load_engram_adapter`."""
    state = model.state_dict() if state_dict is None else state_dict
    type(model).save_pretrained(model, save_directory, *args, **kwargs,
                                state_dict={k: v for k, v in state.items() if not k.startswith("engram_adapter.")})
    if kwargs.get("is_main_process", True):
        save_engram_adapter(model, save_directory)


def active_adapter(model: nn.Module) -> "EngramAdapter":
    """`model.engram_adapter`, or under PEFT's `modules_to_save` wrapper the copy it runs."""
    adapter = getattr(model, "engram_adapter", None)
    if adapter is None:
        raise ValueError("this model has no Engram (add_engram was not called, or it was removed)")
    copies = getattr(adapter, "modules_to_save", None)
    if isinstance(copies, nn.ModuleDict):  # PEFT's ModulesToSaveWrapper
        if adapter.disable_adapters or not adapter.active_adapters:
            return adapter.original_module
        return copies[adapter.active_adapters[0]]
    return adapter


def remove_engram(model: nn.Module) -> None:
    """Take Engram out again: hooks and parameters; the base model's own weights were never touched
    (in adapter mode they are made trainable again)."""
    adapter = getattr(model, "engram_adapter", None)
    if adapter is None:
        raise ValueError("this model has no Engram (add_engram was not called, or it was removed)")
    for handle in active_adapter(model).hooks:
        handle.remove()
    del model.engram_adapter
    model.__dict__.pop("save_pretrained", None)
    for p in model.parameters():
        p.requires_grad_(True)


def engram_param_groups(model: nn.Module, lr: float, table_lr_multiplier: float = 5.0,
                        weight_decay: float = 0.1) -> list[dict]:
    """Optimizer groups for the Engram parameters on the paper's recipe: tables at lr x5 without
    weight decay, the projections and norms at lr."""
    adapter = active_adapter(model)
    tables = [p for n, p in adapter.named_parameters() if ".table." in n]
    others = [p for n, p in adapter.named_parameters() if ".table." not in n]
    return [{"params": others, "lr": lr, "weight_decay": weight_decay},
            {"params": tables, "lr": lr * table_lr_multiplier, "weight_decay": 0.0}]


def save_engram_adapter(model: nn.Module, path: str | Path) -> Path:
    """`engram_adapter.json` (the Engram config and hash layout) + `engram_adapter.safetensors`
    (the Engram weights and the compression table)."""
    adapter = active_adapter(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "engram-torch-adapter"})
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(
        {"config": adapter.config.to_dict(), "hidden_size": adapter.hidden_size,
         "hash_layout": adapter.hasher.layout.to_dict(),
         "base_model": getattr(model.config, "_name_or_path", None) or type(model).__name__}, indent=1))
    return path


def load_engram_adapter(model: nn.Module, path: str | Path, *, mode: str = "adapter") -> nn.Module:
    """Add a saved Engram adapter to a model of the same architecture and vocabulary (a folder
    from `save_engram_adapter`, or from `save_pretrained` of a model with Engram); returns the
    model."""
    from ..hashing.layout import HashLayout

    path = Path(path)
    meta = json.loads((path / ADAPTER_CONFIG).read_text())
    width = meta.get("hidden_size", meta["config"].get("hidden_size"))  # older files: inside the config
    config = EngramConfig.from_dict(meta["config"])
    tensors = read_safetensors(path / ADAPTER_WEIGHTS)
    compression = CompressedTokenizer(tensors["compression"].numpy())
    _, _, hidden, vocab = _decoder_layers(model)
    if width != hidden or len(compression.lookup_table) != vocab:
        raise ValueError(f"{path} was trained for width {width} and {len(compression.lookup_table)} ids; "
                         f"this model has width {hidden} and {vocab} ids")
    adapter = add_engram(model, layers=config.layer_ids, config=config, mode=mode).engram_adapter
    HashLayout.from_dict(meta["hash_layout"]).check_matches(adapter.hasher.layout, str(path / ADAPTER_CONFIG))
    missing, unexpected = adapter.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: adapter weights do not match its config: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return model
