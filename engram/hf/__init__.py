"""transformers integration (the `hf` extra): engram models as transformers causal LMs.

Importing `engram.hf` registers `EngramLMConfig` / `EngramForCausalLM` with `AutoConfig` and
`AutoModelForCausalLM` (model type "engram"), so `from_pretrained` needs no remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .cache import EngramCache
from .config import EngramLMConfig
from .modeling import EngramForCausalLM

AutoConfig.register("engram", EngramLMConfig, exist_ok=True)
AutoModelForCausalLM.register(EngramLMConfig, EngramForCausalLM, exist_ok=True)

__all__ = ["EngramCache", "EngramForCausalLM", "EngramLMConfig"]
