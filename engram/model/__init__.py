"""The backbone: attention, MoE, hyper-connections, blocks, the EngramLM."""

from .accounting import count_params, format_counts, param_counts
from .generate import generate, prompt_lookup, sample_next, speculative_generate
from .io import load_model, save_model
from .planner import allocation, plan_sparsity
from .state import DecodeState
from .transformer import EngramLM, LMOutput

__all__ = ["EngramLM", "LMOutput", "DecodeState", "generate", "speculative_generate", "prompt_lookup", "sample_next",
           "count_params", "param_counts", "format_counts", "plan_sparsity", "allocation", "save_model", "load_model"]
