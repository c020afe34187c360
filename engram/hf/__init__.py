"""transformers integration (the `hf` extra): engram models as transformers causal LMs, and
Engram retrofitted into pretrained ones (`add_engram`).

Importing `engram.hf` registers `EngramLMConfig` / `EngramForCausalLM` with `AutoConfig` and
`AutoModelForCausalLM` (model type "engram"), so `from_pretrained` needs no remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import EngramCache
from .config import EngramLMConfig
from .modeling import EngramForCausalLM
from .qwen4exp import Qwen4ExpMemory, from_qwen4exp, to_qwen4exp
from .retrofit import (EngramCacheLayer, add_engram, engram_param_groups, load_engram_adapter, remove_engram,
                       save_engram_adapter)

AutoConfig.register("engram", EngramLMConfig, exist_ok=True)
AutoModelForCausalLM.register(EngramLMConfig, EngramForCausalLM, exist_ok=True)

__all__ = ["EngramCache", "EngramCacheLayer", "EngramForCausalLM", "EngramLMConfig", "Qwen4ExpMemory", "add_engram",
           "engram_param_groups", "from_qwen4exp", "load_engram_adapter", "remove_engram", "save_engram_adapter",
           "to_qwen4exp"]
