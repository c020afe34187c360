"""`EngramForCausalLM`: engram's `EngramLM` as a transformers causal LM.

`generate` (greedy, sampling, beam search, left-padded batches, assisted and prompt-lookup
decoding), `labels`, `save_pretrained` and `from_pretrained` work as for any transformers
model. The wrapped model is the same code as `engram.EngramLM` (`.model`), so the numbers are
engram's own: `EngramCache` carries the decode state (KV cache, n-gram history, conv history)
between steps and rolls it back for assisted decoding. Generation stops at the model's context
length (`max_seq_len`): the decode state holds no more.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..hashing.layout import HashLayout
from ..model.transformer import EngramLM
from ..precision import upcast
from .cache import EngramCache
from .config import EngramLMConfig
from .init_weights import init_module

logger = logging.getLogger(__name__)

AUTO_MAP = {"AutoConfig": "configuration_engram.EngramLMConfig",
            "AutoModelForCausalLM": "modeling_engram.EngramForCausalLM"}
_SHIMS = {"configuration_engram.py": ("engram.hf.config", "EngramLMConfig"),
          "modeling_engram.py": ("engram.hf.modeling", "EngramForCausalLM")}


@functools.cache
def _checkpointable_class(block_class: type) -> type:
    return type(block_class.__name__, (GradientCheckpointingLayer, block_class), {"__module__": block_class.__module__})


def checkpointable(model: EngramLM) -> EngramLM:
    """Make each block a transformers `GradientCheckpointingLayer` (its class gains that base;
    nothing else changes, and off by default), so `activation_checkpointing_enable()` and
    Trainer's `gradient_checkpointing=True` work as for transformers' own decoders: each block
    reruns its forward in the backward, the cache switched off while training."""
    for block in model.blocks:
        if not isinstance(block, GradientCheckpointingLayer):
            block.__class__ = _checkpointable_class(type(block))
    return model


def write_remote_code_shims(folder) -> None:
    from pathlib import Path

    for name, (module, cls) in _SHIMS.items():
        (Path(folder) / name).write_text(
            f'"""{cls} from the installed engram-torch (pip install "engram-torch[hf]"); no model code here."""\n\n'
            f"from {module} import {cls}  # noqa: F401\n")


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EngramLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"}  # used only with tie_word_embeddings

    def __init__(self, config: EngramLMConfig) -> None:
        super().__init__(config)
        layout = HashLayout.from_dict(config.hash_layout) if config.hash_layout else None
        c = config.model_config
        # The tokenizer's compression table is a saved buffer (model.compression), loaded with
        # the weights; until then a placeholder of the right range lets the model be built.
        placeholder = None
        if c.engram is not None:
            placeholder = np.minimum(np.arange(c.vocab_size), c.engram.compressed_vocab_size - 1)
        self.model = checkpointable(EngramLM(c, layout=layout, compression=placeholder))
        self.post_init()

    @classmethod
    def from_engram(cls, model: EngramLM, special_ids: dict[str, int | None] | None = None) -> "EngramForCausalLM":
        """Wrap an existing `EngramLM` (its weights, compression table and hash layout).
        `special_ids` {"bos", "eos", "pad"} -> id (the tokenizer's, `data.tokenizer.special_ids`)
        go into the config and the generation config, so `generate` stops at eos."""
        ids = {f"{role}_token_id": i for role, i in (special_ids or {}).items() if i is not None}
        config = EngramLMConfig(engram_model=model.config.to_dict(),
                                hash_layout=None if model.layout is None else model.layout.to_dict(), **ids)
        with torch.device("meta"):
            out = cls(config)
        out.model = checkpointable(model)
        for key, value in ids.items():
            setattr(out.generation_config, key, value)
        return out

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, plus `auto_map` and two one-line modules that import this class
        from the installed engram-torch: a process that never imported engram loads the folder
        with `trust_remote_code=True` (transformers has no other hook for a pip-installed model
        type; the modules hold no model code, so the folder runs what is installed)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code_shims(save_directory)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own EngramCache

    def _init_weights(self, module) -> None:
        """transformers' per-module initialization (a model built from a config, or the weights
        a checkpoint lacks): `EngramLM.init_weights`'s rules, module by module, leaving loaded
        tensors alone (`init_weights.init_module`)."""
        names = self.__dict__.get("_module_names")  # id -> (name, module): the module held, so no id is reused
        if names is None or names.get(id(module), (None, None))[1] is not module:
            names = self.__dict__["_module_names"] = {id(m): (n, m) for n, m in self.model.named_modules()}
        if id(module) in names:
            init_module(self.model, names[id(module)][0], module)

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value) -> None:
        self.model.lm_head = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True):
        """transformers' resize of the embedding and the head, and the compression table with
        them: an added id is its own compressed id (the n-grams that contain it hash to rows
        of their own, which training then writes; int64 hashing stays exact, and the hash
        layout, fitted to the compressed vocabulary, is unchanged). Ids removed by a smaller
        vocabulary are dropped from the table."""
        embed = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        old, new = self.model.config.vocab_size, embed.weight.shape[0]
        if new != old:
            inner = self.model
            table = inner._compression_np if getattr(inner, "_compression_np", None) is not None else None
            if table is not None:
                table = np.concatenate([table, np.arange(old, new)]) if new > old else table[:new]
                inner._compression_np = table
                inner.compression = torch.from_numpy(table).to(inner.compression.device)
            inner.config = dataclasses.replace(inner.config, vocab_size=new)
            self.config.engram_model = inner.config.to_dict()
            self.config.vocab_size = new
        return embed

    # ---------------------------------------------------------------- generate
    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, *args, **kwargs) -> None:
        """An `EngramCache` for every cached generate (assisted decoding needs one from the
        start); the generated length is clamped to the context length, with a warning."""
        limit = self.model.config.max_seq_len
        if generation_config.max_length is not None and generation_config.max_length > limit:
            logger.warning("generation stops at the model's context length, %d positions (max_length %d asked)",
                           limit, generation_config.max_length)
            generation_config.max_length = limit
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            model_kwargs["cache"] = EngramCache()
            if getattr(generation_config, "is_assistant", False):
                model_kwargs["cache"].activate_past_recording()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: EngramCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                position_ids: torch.LongTensor | None = None, logits_to_keep: int = 0,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast | tuple:
        """`attention_mask` [B, past + S] marks real tokens (0 = padding, anywhere); positions
        are counted from it by the model itself (`position_ids` is not needed and ignored).
        `labels` [B, S]: the mean next-token loss over labels != -100 (shifted inside);
        `shift_labels` [B, S] (as trainers that shard the sequence pass them): targets already
        aligned with the logits, used instead of `labels`.
        `output_hidden_states`: n_layers + 1 states as transformers' decoders give them: the
        embeddings, then each block's output after its hyper-connection streams are merged
        (their mean), the last one after the final norm. `output_attentions` is refused: the
        attention runs fused (scaled_dot_product_attention) and never forms its weights."""
        if input_ids is None:
            raise ValueError("Engram looks its memory up by token ids: pass input_ids (inputs_embeds alone "
                             "cannot be hashed)")
        if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
            raise ValueError("output_attentions is not available: engram's attention runs fused "
                             "(torch scaled_dot_product_attention) and never forms the attention weights")
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.is_activation_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None  # a rerun forward would write the cache twice
        B, S = input_ids.shape
        valid = None
        if attention_mask is not None:
            mask = attention_mask[:, -S:].to(torch.bool)
            if not bool(mask.all()):
                valid = mask
        state = None
        if use_cache or cache is not None:
            if not isinstance(cache, EngramCache):
                if cache is not None and cache.get_seq_length() > 0:
                    raise ValueError(f"EngramForCausalLM continues only an EngramCache, got a filled "
                                     f"{type(cache).__name__}; let generate create the cache, or pass EngramCache()")
                cache = EngramCache()
            if cache.state is None:
                cache.state = self.model.new_state(B, input_ids.device)
            state = cache.state
            cache.before_forward()
        out = self.model(input_ids, state, valid=valid, return_intermediates=bool(output_hidden_states))
        if cache is not None and state is not None:
            cache.after_forward()
        logits, hidden = out.logits, None
        if output_hidden_states:
            states = out.intermediates["hidden_states"]
            hidden = (out.intermediates["embeddings"], *states[:-1], out.intermediates["final_norm"])
        loss = None
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is not None:  # already aligned with the logits (sequence-parallel trainers)
            loss = F.cross_entropy(upcast(logits.flatten(0, 1)), shift_labels.flatten().to(logits.device),
                                   ignore_index=-100)
        elif labels is not None:
            loss = F.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        result = CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None,
                                        hidden_states=hidden)
        return result if return_dict else result.to_tuple()
