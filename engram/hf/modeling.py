"""`EngramForCausalLM`: engram's `EngramLM` as a transformers causal LM.

`generate` (greedy, sampling, beam search, left-padded batches), `labels`, `save_pretrained`
and `from_pretrained` work as for any transformers model. The wrapped model is the same code
as `engram.EngramLM` (`.model`), so the numbers are engram's own: `EngramCache` carries the
decode state (KV cache, n-gram history, conv history) between steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..hashing.layout import HashLayout
from ..memory.table import MemoryTable
from ..model.moe import MoE
from ..model.transformer import EngramLM
from ..precision import upcast
from .cache import EngramCache
from .config import EngramLMConfig


class EngramForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = EngramLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
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
        self.model = EngramLM(c, layout=layout, compression=placeholder)
        self.post_init()

    @classmethod
    def from_engram(cls, model: EngramLM) -> "EngramForCausalLM":
        """Wrap an existing `EngramLM` (its weights, compression table and hash layout)."""
        config = EngramLMConfig(engram_model=model.config.to_dict(),
                                hash_layout=None if model.layout is None else model.layout.to_dict())
        with torch.device("meta"):
            out = cls(config)
        out.model = model
        return out

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward creates its own EngramCache

    def _init_weights(self, module) -> None:
        """Only what is not saved: EngramLM initializes its own weights when built, and the
        saved ones (the compression table included) are loaded, never redrawn. Refills the
        derived buffers a meta-device load leaves empty."""
        if isinstance(module, MemoryTable):
            module.reset_buffers()
        elif isinstance(module, MoE):
            module.expert_load.zero_()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: EngramCache | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                position_ids: torch.LongTensor | None = None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        """`attention_mask` [B, past + S] marks real tokens (0 = padding, anywhere); positions
        are counted from it by the model itself (`position_ids` is not needed and ignored).
        `labels` [B, S]: the mean next-token loss over labels != -100 (shifted inside)."""
        if input_ids is None:
            raise ValueError("Engram looks its memory up by token ids: pass input_ids (inputs_embeds alone "
                             "cannot be hashed)")
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
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
        logits = self.model(input_ids, state, valid=valid).logits
        loss = None
        if labels is not None:
            loss = F.cross_entropy(upcast(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten().to(logits.device),
                                   ignore_index=-100)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
