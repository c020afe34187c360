"""Parameter, FLOP and memory-traffic accounting, from a built model or from a config alone.

Convention (the paper's): P_tot and P_act exclude the vocabulary embedding and the LM head.
Active = what one token touches: every dense weight, top_k / E of each MoE layer's routed
experts, and the H table rows each Engram layer reads. `count_params(config)` computes the
same split as `param_counts(model)` without building weights; a test holds them equal.
"""

from __future__ import annotations

import re

from torch import nn

from ..config import ModelConfig

CATEGORIES = ("embedding", "lm_head", "attention", "norms", "dense_mlp", "shared_experts",
              "routed_experts", "router", "hyper_connections", "engram_tables", "engram_dense")

_RULES = [  # (pattern on the parameter name, category); first match wins
    (r"^embed\.", "embedding"), (r"^lm_head\.", "lm_head"), (r"^norm\.", "norms"),
    (r"\.engram\.table\.", "engram_tables"), (r"\.engram\.", "engram_dense"),
    (r"\.attn\.", "attention"), (r"\.(attn|mlp)_norm\.", "norms"),
    (r"\.mlp\.shared\.", "shared_experts"), (r"\.mlp\.experts\.", "routed_experts"),
    (r"\.mlp\.router\.", "router"), (r"\.mlp\.w_(gate|up|down)\.", "dense_mlp"),
    (r"\.hc_(attn|mlp)\.", "hyper_connections"),
]


def _category(name: str) -> str:
    for pattern, category in _RULES:
        if re.search(pattern, name):
            return category
    raise AssertionError(f"parameter {name!r} has no accounting category; add a rule in accounting.py")


def _summarize(config: ModelConfig, counts: dict[str, int]) -> dict[str, int | float]:
    """Add totals, active counts, FLOPs and table traffic to a per-category split."""
    c, moe, e = config, config.moe, config.engram
    n_moe = sum(c.is_moe_layer(i) for i in range(c.n_layers))
    active_routed = 0 if moe is None else counts["routed_experts"] * moe.top_k // moe.n_routed_experts
    rows_read = 0 if e is None else len(e.layer_ids) * e.n_hash_heads * e.row_dim  # per token
    total = sum(v for k, v in counts.items() if k not in ("embedding", "lm_head"))
    dense_active = total - counts["routed_experts"] - counts["engram_tables"]
    active = dense_active + active_routed + rows_read
    attn_flops = 2 * 2 * c.n_layers * c.n_heads * c.attn_head_dim  # x context length (QK^T, AV)
    out = {f"{k}_params": v for k, v in counts.items()}
    out.update(
        total=total, active=active, numel=sum(counts.values()),
        engram=counts["engram_tables"] + counts["engram_dense"],
        routed_experts=0 if moe is None else moe.n_routed_experts, n_moe_layers=n_moe,
        active_routed_params=active_routed, engram_rows_read_params=rows_read,
        # 2 FLOPs per active weight, the head included (it runs for every token); attention
        # scores over an average causal context of max_seq_len / 2
        flops_per_token=2 * (active - rows_read + counts["lm_head"] + (c.vocab_size * c.hidden_size
                                                                       if c.tie_embeddings else 0))
        + attn_flops * c.max_seq_len // 2,
        table_bytes_per_token_fp32=4 * rows_read,
    )
    return out


def param_counts(model: nn.Module) -> dict[str, int | float]:
    """The split of a built model's parameters; asserts every parameter is counted once."""
    counts = dict.fromkeys(CATEGORIES, 0)
    for name, p in model.named_parameters():  # tied weights appear once
        counts[_category(name)] += p.numel()
    numel = sum(p.numel() for p in model.parameters())
    assert sum(counts.values()) == numel, f"accounting split {sum(counts.values())} != numel {numel}"
    return _summarize(model.config, counts)


def count_params(config: ModelConfig) -> dict[str, int | float]:
    """The same numbers as `param_counts(EngramLM(config))`, from the config alone."""
    c, D, V = config, config.hidden_size, config.vocab_size
    H, G, E = c.n_heads, c.kv_heads, c.attn_head_dim
    counts = dict.fromkeys(CATEGORIES, 0)
    counts["embedding"] = V * D
    counts["lm_head"] = 0 if c.tie_embeddings else V * D
    counts["norms"] = D + c.n_layers * 2 * D
    counts["attention"] = c.n_layers * (2 * D * H * E + 2 * D * G * E)
    M = c.n_streams
    per_hc = 0 if M == 1 else (2 * M + M * M) * M * D + 3 + 2 * M + M * M
    counts["hyper_connections"] = c.n_layers * 2 * per_hc
    for layer in range(c.n_layers):
        if c.is_moe_layer(layer):
            m = c.moe
            counts["shared_experts"] += 3 * D * m.shared_width
            counts["routed_experts"] += m.n_routed_experts * 3 * D * m.expert_hidden_size
            counts["router"] += D * m.n_routed_experts
        else:
            counts["dense_mlp"] += 3 * D * c.mlp_hidden_size
    if c.engram is not None:
        from ..hashing.layout import reference_primes

        e = c.engram
        primes = reference_primes(e.layer_ids, e.max_ngram_size, e.n_head_per_ngram, e.rows_per_head)
        rows = len(e.layer_ids) * e.n_hash_heads if e.single_row else sum(sum(p) for p in primes.values())
        counts["engram_tables"] = rows * e.row_dim
        n_out = D * (1 + M) if e.use_gate else D
        per_layer = e.memory_dim * n_out + (n_out if e.bias else 0)
        if e.use_gate:
            per_layer += 2 * M * D  # key and query RMSNorm gains
        if e.use_short_conv:
            per_layer += M * D + M * D * e.kernel_size  # conv RMSNorm gains + depthwise filters
        counts["engram_dense"] = len(e.layer_ids) * per_layer
    return _summarize(c, counts)


def format_counts(counts: dict[str, int | float]) -> str:
    """A human table of a `count_params` / `param_counts` result."""
    lines = [f"{'parameters':24s} {'count':>16s}"]
    for k in CATEGORIES:
        lines.append(f"{k:24s} {counts[k + '_params']:16,d}")
    for k in ("total", "active", "engram", "active_routed_params", "flops_per_token", "table_bytes_per_token_fp32"):
        lines.append(f"{k:24s} {counts[k]:16,d}")
    return "\n".join(lines)
