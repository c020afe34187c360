"""Configuration: frozen, keyword-only dataclasses that validate themselves.

Every error message says what was expected, what was given, and how to fix it. Configs
round-trip through JSON (`to_dict` / `from_dict`) so they can be saved beside a model.

Layer ids are 0-based everywhere in engram-torch (the paper counts layers from 1: its
"layers 2 and 15" are our `layer_ids=(1, 14)`; the public demo's `[1, 15]` is already 0-based).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

_log = logging.getLogger("engram.config")
_reported: set[str] = set()  # old-field notes already logged (once per process each)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _fits(value: Any, annotation: str) -> bool:
    """Does a JSON value fit a dataclass field's annotation (int, float, bool, str,
    tuple[int, ...], a nested config, each optionally `| None`)? bool is never a number."""
    for option in (o.strip() for o in annotation.split("|")):
        number = not isinstance(value, bool)
        if (option == "None" and value is None) or (option == "bool" and isinstance(value, bool)) \
                or (option == "int" and number and isinstance(value, int)) \
                or (option == "float" and number and isinstance(value, (int, float))) \
                or (option == "str" and isinstance(value, str)) \
                or (option == "tuple[int, ...]" and isinstance(value, (list, tuple))
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in value)) \
                or (option.endswith("Config") and (isinstance(value, dict) or type(value).__name__ == option)):
            return True
    return False


def check_field_types(cls, data: dict[str, Any], where: str) -> None:
    """A config file's fields, one by one, types included: an error names the field, what it
    must be and what it is (no traceback from deep inside the model)."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} holds a JSON {type(data).__name__}, not an object of {cls.__name__} fields")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ValueError(f"{where}: unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(types)}")
    for name, value in data.items():
        if not _fits(value, types[name]):
            raise ValueError(f"{where}: field {name!r} must be {types[name]}, got {value!r} ({type(value).__name__})")


def note_old_field(note: str) -> None:
    """Log how an old field of a stored file was read, once per process (a checkpoint's config
    is read several times on load)."""
    if note not in _reported:
        _reported.add(note)
        _log.info("engram.config: %s", note)


def rename_old_field(data: dict[str, Any], old: str, new: str, what: str = "") -> None:
    """Read the old name `old` of a stored field as `new`, in place (logged once); a file that
    has both is refused. `what` names the kind of file in the messages ("hash layout ")."""
    if old in data:
        _require(new not in data, f"{what or 'the '}config has both {new} and its old name {old}; keep {new}")
        data[new] = data.pop(old)
        note_old_field(f"old {what}field {old} read as {new}")


def _upgrade_engram_dict(data: dict[str, Any], *, hidden_size: int | None,
                         n_streams: int | None) -> dict[str, Any]:
    """A stored Engram config with today's field names (docs/names.md has the table).

    - `vocab_size_per_ngram` is `rows_per_head`;
    - `hidden_size` / `n_branches` (before issue 10) were copies of the model's: checked against
      the model's when known, then dropped;
    - `sparse_grad` is the table optimizer's choice now: dropped;
    - `table_init_std` missing: the file predates the field, whose default was N(0, 1).
    """
    data = dict(data)
    rename_old_field(data, "vocab_size_per_ngram", "rows_per_head")
    for old, new, model in (("hidden_size", "hidden_size", hidden_size), ("n_branches", "n_streams", n_streams)):
        if old in data:
            given = data.pop(old)
            _require(
                given is None or model is None or given == model,
                f"engram.{old}={given} conflicts with the model's {new}={model}; the Engram modules take the "
                f"model's {new}: leave it out of the engram config and set {new} on ModelConfig",
            )
            note_old_field(f"old field engram.{old} dropped (the Engram modules take the model's {new})")
    if "sparse_grad" in data:
        data.pop("sparse_grad")
        note_old_field("old field engram.sparse_grad dropped (the table optimizer decides: sparse_adam and "
                       "row_adam call EngramLM.use_sparse_table_grads)")
    if "table_init_std" not in data:
        data["table_init_std"] = 1.0
        note_old_field("engram.table_init_std missing (a file from before the field) read as 1.0, N(0, 1) rows")
    return data


def _upgrade_model_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A stored ModelConfig with today's field names: `n_branches` is `n_streams`."""
    data = dict(data)
    rename_old_field(data, "n_branches", "n_streams")
    return data


@dataclass(frozen=True, kw_only=True)
class EngramConfig:
    """Shape and behaviour of the Engram modules of one model (all layers share it).

    Hashing fields (`layer_ids` .. `reset_id`) define the hash layout; module fields
    (`n_embed_per_ngram` ..) define the weights. `pad_id` and `compressed_vocab_size` are in
    the *compressed* id space (see `CompressedTokenizer`). The model's width D and stream
    count M are the model's (`ModelConfig`), given to each `Engram` module when it is built.
    Whether table gradients are sparse is the optimizer's choice, not the config's
    (`EngramLM.use_sparse_table_grads`). Old field names still load (`from_dict`, docs/names.md).
    """

    # -- hashing (docs/paper.md step 3) --
    compressed_vocab_size: int
    pad_id: int
    layer_ids: tuple[int, ...]
    # rows asked for per hash head, one entry per n-gram order 2..N; each head's table gets the
    # next unused prime above it (the hash layout's `primes`)
    rows_per_head: tuple[int, ...]
    max_ngram_size: int = 3
    n_head_per_ngram: int = 8
    seed: int = 0
    # n-grams do not reach back across this compressed id (a document boundary, e.g. EOS in packed
    # sequences): earlier ids read as pad_id. None: they run across everything (the paper's demo).
    reset_id: int | None = None
    # -- module (docs/paper.md steps 4-8) --
    n_embed_per_ngram: int = 512
    kernel_size: int = 4
    use_short_conv: bool = True
    conv_zero_init: bool = True
    use_gate: bool = True
    # std of the table rows at initialization. 0 (new models) starts every row at zero, so a row
    # no training step has read adds nothing (no random noise from rare rows); 1 is nn.Embedding's
    # N(0, 1), the demo's, and what a stored config without this field means (`from_dict`).
    table_init_std: float = 0.0
    bias: bool = False
    gate_norm_eps: float | None = 1e-6
    conv_norm_eps: float | None = 1e-5
    # Ablation: every n-gram reads its head's one shared row (the "capacity-1" control), so the
    # memory cannot tell n-grams apart; the hash layout stays as configured.
    single_row: bool = False

    def __post_init__(self) -> None:
        # JSON gives lists; keep tuples so the config stays hashable and frozen.
        object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        object.__setattr__(self, "rows_per_head", tuple(int(v) for v in self.rows_per_head))
        n = self.max_ngram_size
        _require(
            2 <= n <= 8,
            f"max_ngram_size must be in 2..8 (the paper uses 3), got {n}",
        )
        _require(
            len(self.rows_per_head) == n - 1,
            f"rows_per_head needs one entry per order 2..{n} ({n - 1} values), "
            f"got {len(self.rows_per_head)}: {list(self.rows_per_head)}",
        )
        _require(
            all(v >= 2 for v in self.rows_per_head),
            f"every rows_per_head entry must be >= 2, got {list(self.rows_per_head)}",
        )
        _require(
            len(self.layer_ids) >= 1 and all(i >= 0 for i in self.layer_ids),
            f"layer_ids must be one or more 0-based layer indices, got {list(self.layer_ids)}",
        )
        _require(
            len(set(self.layer_ids)) == len(self.layer_ids),
            f"layer_ids must not repeat, got {list(self.layer_ids)}",
        )
        _require(
            self.compressed_vocab_size >= 1,
            f"compressed_vocab_size must be >= 1, got {self.compressed_vocab_size}; "
            "use len(CompressedTokenizer)",
        )
        _require(
            0 <= self.pad_id < self.compressed_vocab_size,
            f"pad_id must be a compressed id in [0, {self.compressed_vocab_size}), got "
            f"{self.pad_id}; map the tokenizer's pad id through CompressedTokenizer first",
        )
        _require(self.n_head_per_ngram >= 1, f"n_head_per_ngram must be >= 1, got {self.n_head_per_ngram}")
        _require(
            self.n_embed_per_ngram % self.n_head_per_ngram == 0,
            f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be divisible by "
            f"n_head_per_ngram ({self.n_head_per_ngram}): each head gets an equal slice",
        )
        _require(self.kernel_size >= 1, f"kernel_size must be >= 1, got {self.kernel_size}")
        _require(math.isfinite(self.table_init_std) and self.table_init_std >= 0,
                 f"table_init_std must be a finite number >= 0 (1: N(0, 1) rows, 0: zero rows), "
                 f"got {self.table_init_std}")
        for name in ("gate_norm_eps", "conv_norm_eps"):
            eps = getattr(self, name)
            _require(eps is None or eps > 0, f"{name} must be > 0 or None (dtype default), got {eps}")

    # -- derived sizes (shape legend: H hash heads per layer, E row width) --
    @property
    def n_hash_heads(self) -> int:
        """H: tables per Engram layer, (N - 1) orders x K heads."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def row_dim(self) -> int:
        """E: width of one table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem: width of the concatenated memory vector e_t."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, hidden_size: int | None = None,
                  n_streams: int | None = None) -> "EngramConfig":
        """From `to_dict` output, or from a stored file with old field names (docs/names.md).
        `hidden_size` / `n_streams`: the model's, to check an old file's copies against."""
        data = _upgrade_engram_dict(data, hidden_size=hidden_size, n_streams=n_streams)
        check_field_types(cls, data, "the engram config")
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """DeepSeekMoE: shared experts + fine-grained routed experts, sigmoid scores, top-k,
    auxiliary-loss-free balancing through a per-expert routing bias."""

    n_routed_experts: int
    n_shared_experts: int = 1
    top_k: int
    expert_hidden_size: int  # SwiGLU width of one routed expert
    # Total SwiGLU width of the shared experts; None: n_shared_experts * expert_hidden_size.
    # `plan_sparsity` trims it to pay for Engram's dense projections at equal active parameters.
    shared_hidden_size: int | None = None
    first_k_dense: int = 1  # the first k blocks use a dense MLP instead of MoE
    route_scale: float = 1.0  # multiplies the normalized top-k weights
    bias_update_rate: float = 1e-3  # gamma: bias += gamma * sign(mean load - load) per update

    def __post_init__(self) -> None:
        _require(self.n_routed_experts >= 1, f"n_routed_experts must be >= 1, got {self.n_routed_experts}")
        _require(
            1 <= self.top_k <= self.n_routed_experts,
            f"top_k must be in 1..n_routed_experts={self.n_routed_experts}, got {self.top_k}",
        )
        _require(self.n_shared_experts >= 0, f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        _require(self.expert_hidden_size >= 1, f"expert_hidden_size must be >= 1, got {self.expert_hidden_size}")
        _require(
            self.shared_hidden_size is None or self.shared_hidden_size >= 1,
            f"shared_hidden_size must be >= 1 or None, got {self.shared_hidden_size}",
        )
        _require(self.first_k_dense >= 0, f"first_k_dense must be >= 0, got {self.first_k_dense}")
        _require(self.bias_update_rate >= 0, f"bias_update_rate must be >= 0, got {self.bias_update_rate}")

    @property
    def shared_width(self) -> int:
        """SwiGLU width of the shared experts together (0: none)."""
        if self.n_shared_experts == 0:
            return 0
        return self.shared_hidden_size or self.n_shared_experts * self.expert_hidden_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """An EngramLM: pre-norm blocks of attention (GQA, RoPE) and a dense or MoE MLP, on M
    hyper-connection streams (M = 1: the plain residual stream), with Engram modules at
    `engram.layer_ids` (0-based block indices; None: no Engram). The Engram modules take the
    model's width (`hidden_size`, D) and streams (`n_streams`, M)."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None: = n_heads (multi-head); fewer: grouped-query
    head_dim: int | None = None  # attention head width; None: hidden_size // n_heads
    mlp_hidden_size: int  # SwiGLU width of the dense MLP (all blocks without MoE)
    moe: MoEConfig | None = None
    n_streams: int = 1  # M: hyper-connection streams
    sinkhorn_iters: int = 20
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    engram: EngramConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            object.__setattr__(self, "moe", MoEConfig(**self.moe))
        if isinstance(self.engram, dict):
            object.__setattr__(self, "engram", EngramConfig.from_dict(
                self.engram, hidden_size=self.hidden_size, n_streams=self.n_streams))
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "mlp_hidden_size", "max_seq_len"):
            _require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        kv = self.kv_heads
        _require(
            kv >= 1 and self.n_heads % kv == 0,
            f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads}) for grouped-query attention",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.n_heads == 0,
                f"hidden_size ({self.hidden_size}) must be divisible by n_heads ({self.n_heads}), "
                "or set head_dim explicitly",
            )
        _require(self.attn_head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.attn_head_dim}")
        _require(self.n_streams >= 1, f"n_streams must be >= 1 (1 = plain residual), got {self.n_streams}")
        if self.moe is not None:
            _require(
                self.moe.first_k_dense <= self.n_layers,
                f"moe.first_k_dense ({self.moe.first_k_dense}) exceeds n_layers ({self.n_layers})",
            )
        if self.engram is not None:
            e = self.engram
            _require(
                max(e.layer_ids) < self.n_layers,
                f"engram.layer_ids {list(e.layer_ids)} must be 0-based block indices < n_layers={self.n_layers}",
            )

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attn_head_dim(self) -> int:
        return self.hidden_size // self.n_heads if self.head_dim is None else self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer >= self.moe.first_k_dense

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["moe"] = None if self.moe is None else self.moe.to_dict()
        d["engram"] = None if self.engram is None else self.engram.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """From `to_dict` output, or from a stored file with old field names (docs/names.md)."""
        data = _upgrade_model_dict(data)
        check_field_types(cls, data, "the model config")
        if isinstance(data.get("moe"), dict):
            check_field_types(MoEConfig, data["moe"], "the moe config")
        return cls(**data)
