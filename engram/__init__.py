"""engram-torch: conditional memory via scalable lookup (DeepSeek's Engram) for PyTorch."""

from . import presets
from .config import EngramConfig, ModelConfig, MoEConfig
from .hashing import CompressedTokenizer, HashLayout, NgramHasher
from .memory import (CachedTable, DiskTable, Engram, HostTable, InMemoryTable, MemoryTable, QuantizedTable,
                     ShortConvState)
from .model import (DecodeState, EngramLM, allocation, count_params, generate, load_model, param_counts,
                    plan_sparsity, save_model, speculative_generate)
from . import compat  # noqa: E402  (engram.compat.reference_engram without a second import)

__version__ = "0.1.0"

__all__ = [
    "EngramConfig", "ModelConfig", "MoEConfig", "presets", "CompressedTokenizer", "HashLayout", "NgramHasher",
    "Engram", "MemoryTable", "InMemoryTable", "HostTable", "DiskTable", "CachedTable", "QuantizedTable",
    "ShortConvState", "EngramLM", "DecodeState", "generate", "speculative_generate", "count_params", "param_counts", "plan_sparsity", "allocation",
    "save_model", "load_model",
]
