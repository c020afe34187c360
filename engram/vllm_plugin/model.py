"""`EngramForCausalLM` inside vLLM: vLLM's attention, KV cache, scheduler, sampler and
parallel linear layers around engram's own hashing, Engram module, MoE and
hyper-connections.

The model reads an `engram export-hf` folder as it is (same weight names). What differs
from `engram.EngramLM` is only what a paged, continuously batched engine needs:
- attention is vLLM's `Attention` over its paged KV cache, with vLLM's rotary embedding and
  RMSNorm; q/k/v, the output projection and the dense MLP are vLLM's tensor-parallel linears
  (the same math as engram's, in vLLM's kernels);
- the batch is one flat run of tokens from many requests. Each token's n-gram history and
  short-conv history come from `PagedHistory`, stored per KV slot (see history.py), so
  chunked prefill, prefix caching, preemption and speculative decoding keep them exact;
- the Engram tables are served where the paper puts them, chosen with `--hf-overrides`:
  - resident (default): on the device, loaded with the other weights;
  - `{"engram_table_tier": "host"}`: one copy in host memory (pinned when there is a GPU);
  - `{"engram_tables": DIR, "engram_cache_rows": N}`: memory-mapped from a folder written by
    `engram offload` (plain or int8/fp8 rows), behind N hot rows. The mapped pages stay mapped,
    shared through the page cache by every worker on the node (`"engram_release_pages": true`
    unmaps them after each gather instead: a smaller RSS, a page fault per row read). Every
    block's checksum is checked at start (`"engram_verify_tables": false` defers that to each
    block's first touch), so a corrupt file is refused before it serves.
  Rows are prefetched right after hashing, before the blocks.
- named memory overlays (`{"engram_overlays": {NAME: DIR}}`) load at start over whichever
  tables these are, and each request selects its own (overlays.py).

Under tensor parallelism the attention and dense MLP are sharded by vLLM's linears; the
Engram tables, the Engram projections, the MoE and the hyper-connections are replicated on
every rank (each rank computes the same values from the same full hidden state).
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..config import ModelConfig
from ..hashing.layout import HashLayout
from ..hashing.ngram import NgramHasher
from ..memory.disk_format import DiskTable
from ..memory.engram import Engram
from ..memory.host import HostTable
from ..model.hyper import HyperConnection, expand_streams, merge_streams
from ..model.moe import MoE
from ..runs import check_tables_belong, checkpoint_identity, disk_tables
from .history import PagedBatch, PagedHistory
from .overlays import ServedOverlays, prefix_cache_salted, selector_for

logger = logging.getLogger(__name__)

# engram's weight names -> (vLLM module name, shard of a merged linear)
_STACKED = ((".attn.wq.", ".attn.qkv_proj.", "q"), (".attn.wk.", ".attn.qkv_proj.", "k"),
            (".attn.wv.", ".attn.qkv_proj.", "v"), (".mlp.w_gate.", ".mlp.gate_up_proj.", 0),
            (".mlp.w_up.", ".mlp.gate_up_proj.", 1))
_RENAMED = ((".attn.wo.", ".attn.o_proj."), (".mlp.w_down.", ".mlp.down_proj."))


class PagedAttention(nn.Module):
    """Grouped-query attention on vLLM's cache, with vLLM's rotary embedding in engram's
    convention (neox style: the two halves of each head rotate against each other)."""

    def __init__(self, c: ModelConfig, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        tp = get_tensor_model_parallel_world_size()
        D, E = c.hidden_size, c.attn_head_dim
        if c.n_heads % tp:
            raise ValueError(f"tensor parallel size {tp} does not divide the {c.n_heads} attention heads")
        self.head_dim, self.n_heads, self.n_kv_heads = E, c.n_heads // tp, max(1, c.kv_heads // tp)
        quant = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(D, E, c.n_heads, c.kv_heads, bias=False, quant_config=quant,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(c.n_heads * E, D, bias=False, quant_config=quant, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(E, max_position=c.max_seq_len, is_neox_style=True,
                                   rope_parameters={"rope_theta": c.rope_theta})
        self.attn = Attention(self.n_heads, E, E ** -0.5, num_kv_heads=self.n_kv_heads,
                              cache_config=vllm_config.cache_config, quant_config=quant, prefix=f"{prefix}.attn")

    def forward(self, x_TD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x_TD)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class ParallelMLP(nn.Module):
    """engram's SwiGLU (w_down(silu(w_gate x) * w_up x)) as vLLM's sharded linears."""

    def __init__(self, dim: int, hidden: int, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        quant = vllm_config.quant_config
        self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=False, quant_config=quant,
                                                       prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(hidden, dim, bias=False, quant_config=quant, prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y, _ = self.gate_up_proj(x.reshape(-1, shape[-1]))
        y, _ = self.down_proj(self.act(y))
        return y.view(shape)


class PagedBlock(nn.Module):
    """engram's `Block` (Engram -> attention -> MLP on the hyper-connection streams) on a
    flat batch [1, T, M, D], with the same submodule names."""

    def __init__(self, c: ModelConfig, layer: int, table_sizes, table, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        D, M = c.hidden_size, c.n_streams
        self.layer = layer
        self.engram = None
        if table_sizes is not None:
            self.engram = Engram(c.engram, table_sizes, hidden_size=D, n_streams=M, layer_id=layer, table=table)
            self.engram.table.validate_rows = False  # rows come from the model's own hasher
        self.attn_norm = RMSNorm(D, eps=c.norm_eps)
        self.attn = PagedAttention(c, vllm_config, f"{prefix}.attn")
        self.mlp_norm = RMSNorm(D, eps=c.norm_eps)
        self.mlp = (MoE(D, c.moe) if c.is_moe_layer(layer)
                    else ParallelMLP(D, c.mlp_hidden_size, vllm_config, f"{prefix}.mlp"))
        hc = dict(sinkhorn_iters=c.sinkhorn_iters, norm_eps=c.norm_eps)
        self.hc_attn = HyperConnection(D, M, layer_index=2 * layer, **hc)
        self.hc_mlp = HyperConnection(D, M, layer_index=2 * layer + 1, **hc)

    def _engram(self, x_1TMD: torch.Tensor, rows_1TH: torch.Tensor, history: PagedHistory,
                batch: PagedBatch | None) -> torch.Tensor:
        v_1TMD, _ = self.engram.gated_value(x_1TMD, rows_1TH)
        conv = self.engram.short_conv
        if conv is None:
            return v_1TMD
        T, M, D = v_1TMD.shape[1:]
        inputs_TC = conv.norm(v_1TMD).reshape(T, M * D)
        if batch is None:  # profiling run: no history exists
            taps_TKC = torch.cat([inputs_TC.new_zeros(T, conv.kernel_size - 1, M * D), inputs_TC[:, None]], dim=1)
        else:
            taps_TKC = history.conv_taps(self.layer, batch, inputs_TC)
        return v_1TMD + conv.from_taps(taps_TKC).view(1, T, M, D)

    def forward(self, x_1TMD: torch.Tensor, positions: torch.Tensor, rows_1TH: torch.Tensor | None,
                history: PagedHistory, batch: PagedBatch | None) -> torch.Tensor:
        if self.engram is not None:
            x_1TMD = x_1TMD + self._engram(x_1TMD, rows_1TH, history, batch)
        x_1TMD = self.hc_attn(x_1TMD, lambda h: self.attn(self.attn_norm(h[0]), positions)[None])
        return self.hc_mlp(x_1TMD, lambda h: self.mlp(self.mlp_norm(h)))


class PagedEngramLM(nn.Module):
    """The module tree under `model.` (embed, blocks, norm, lm_head, compression), so an
    exported folder's weight names load as they are."""

    def __init__(self, c: ModelConfig, layout: HashLayout | None, vllm_config: VllmConfig, prefix: str,
                 table_factory=None) -> None:
        super().__init__()
        self.config = c
        self.layout = layout
        self.hasher = None if layout is None else NgramHasher.from_layout(layout)
        sizes: dict[int, list[int]] = {}
        if self.hasher is not None:
            layout.check_matches(c.engram, "the served model's Engram config")
            sizes = self.hasher.table_sizes
            if c.engram.single_row:
                sizes = {layer: [1] * len(s) for layer, s in sizes.items()}
            self.register_buffer("compression", torch.zeros(c.vocab_size, dtype=torch.long))
        self.embed = VocabParallelEmbedding(c.vocab_size, c.hidden_size, prefix=f"{prefix}.embed")
        self.blocks = nn.ModuleList(
            PagedBlock(c, i, sizes.get(i), None if table_factory is None or i not in sizes
                       else table_factory(i, sizes[i], c.engram.row_dim), vllm_config, f"{prefix}.blocks.{i}")
            for i in range(c.n_layers))
        self.norm = RMSNorm(c.hidden_size, eps=c.norm_eps)
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=f"{prefix}.lm_head")
        if c.tie_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.embed)


def _table_factory(hf_config):
    """Where the tables live (see the module docstring); None: resident, loaded as weights."""
    tables, tier = getattr(hf_config, "engram_tables", None), getattr(hf_config, "engram_table_tier", "resident")
    if tier not in ("resident", "host"):
        raise ValueError(f"engram_table_tier must be resident or host, got {tier!r} (tables on disk: engram_tables)")
    if tables:
        if tier != "resident":
            raise ValueError("give engram_tables (tables on disk) or engram_table_tier host, not both")
        return disk_tables(tables, getattr(hf_config, "engram_cache_rows", None),
                           release_pages=bool(getattr(hf_config, "engram_release_pages", False)))
    if getattr(hf_config, "engram_cache_rows", None):
        raise ValueError("engram_cache_rows needs engram_tables (a folder made by engram offload)")
    if tier == "host":  # filled by load_weights
        return lambda layer, sizes, dim: HostTable(sizes, dim, torch.empty(sum(sizes), dim, device="cpu"))
    return None


def _served_config(hf_config) -> tuple[ModelConfig, HashLayout | None]:
    engram_model = getattr(hf_config, "engram_model", None)
    if not engram_model:
        raise ValueError("this folder's config.json has no engram_model; write the folder with engram export-hf")
    c = ModelConfig.from_dict(engram_model)
    layout = getattr(hf_config, "hash_layout", None)
    if c.engram is not None and not layout:
        raise ValueError("this folder's config.json has an Engram config but no hash_layout; "
                         "write the folder with engram export-hf")
    return c, (HashLayout.from_dict(layout) if c.engram is not None else None)


class EngramForVLLM(nn.Module):
    """The vLLM model class registered for the `EngramForCausalLM` architecture."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        hf_config = vllm_config.model_config.hf_config
        c, layout = _served_config(hf_config)
        self.config = c
        self.model = PagedEngramLM(c, layout, vllm_config, "model", _table_factory(hf_config))
        self.tables_offloaded = bool(getattr(hf_config, "engram_tables", None))
        if self.tables_offloaded:  # tables from another model would serve plausible, wrong numbers
            check_tables_belong(hf_config.engram_tables, vllm_config.model_config.model, layout, warn=logger.warning)
        if self.tables_offloaded and getattr(hf_config, "engram_verify_tables", True):
            for module in self.modules():
                if isinstance(module, DiskTable):
                    module.check_all_blocks()
        self.host_tables = {f"{name}.weight": module for name, module in self.named_modules()
                            if isinstance(module, HostTable)}
        self.logits_processor = LogitsProcessor(c.vocab_size)
        self.block_size = vllm_config.cache_config.block_size
        e = c.engram
        # vLLM's runner passes each request's prompt ids before its chunk when this is > 0
        self.token_lookback_depth = 0 if e is None else e.max_ngram_size - 1
        conv = {b.layer: (c.n_streams * c.hidden_size, b.engram.short_conv.kernel_size,
                          b.engram.short_conv.dilation)
                for b in self.model.blocks if b.engram is not None and b.engram.short_conv is not None}
        pad = 0 if self.model.hasher is None else self.model.hasher.pad_id
        self.history = PagedHistory(self.token_lookback_depth, pad, conv)
        self._checked_slots = False
        self.vllm_config = vllm_config
        self.overlay_folders = dict(getattr(hf_config, "engram_overlays", None) or {})
        self.served_overlays = None  # set after the weights load (the overlays' base rows are checked)
        if self.overlay_folders:
            if layout is None:
                raise ValueError("engram_overlays: this model has no Engram tables to overlay")
            if vllm_config.speculative_config is not None:
                raise ValueError("engram_overlays cannot be served with speculative decoding on vLLM 0.32: it drops "
                                 "the logits processors that carry each request's overlay choice")
            if vllm_config.cache_config.enable_prefix_caching and not prefix_cache_salted():
                raise ValueError("engram_overlays change a request's keys and values, and this vLLM offers no way to "
                                 "key its prefix cache by them (it would hand one overlay's cached blocks to another's "
                                 "request): start the engine with --no-enable-prefix-caching")
        self.eval()  # serving: no MoE load counting

    # ------------------------------------------------------------------ vLLM's interface
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def _paged_batch(self, positions: torch.Tensor) -> PagedBatch | None:
        """Where this batch's tokens live, or None in a profiling run (no KV cache yet)."""
        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, list):
            metadata = metadata[0]
        attn = self.model.blocks[0].attn.attn
        if not isinstance(metadata, dict) or attn.layer_name not in metadata:
            return None
        caches = [block.attn.attn.kv_cache for block in self.model.blocks]
        if not self.history.bind(caches, self.block_size, self.model.norm.weight.dtype):
            return None
        batch = PagedBatch.from_metadata(positions, metadata[attn.layer_name], self.block_size, self.history.num_slots)
        if not self._checked_slots:  # once: the slot arithmetic must match the cache's layout
            real = batch.slots[batch.slots <= self.history.num_slots]
            if real.numel() and int(real.max()) >= self.history.num_slots:
                raise RuntimeError(f"KV slot {int(real.max())} is outside the {self.history.num_slots} slots the "
                                   "Engram history assumed (blocks x block_size); this attention backend lays "
                                   "its cache out differently")
            self._checked_slots = True
        return batch

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, lookback_token_ids: torch.Tensor | None = None,
                **_) -> torch.Tensor:
        m, c = self.model, self.config
        if input_ids is None:
            raise ValueError("Engram looks its memory up by token ids; it cannot serve prompt embeddings")
        batch = self._paged_batch(positions)
        if self.served_overlays is not None and batch is not None:
            selector = selector_for(self.vllm_config)
            if selector is None:
                raise RuntimeError("engram_overlays are loaded but no OverlaySelector runs in this worker: install "
                                   "engram-torch into vLLM's venv (its vllm.logits_processors entry point), or pass "
                                   "--logits-processors engram.vllm_plugin.overlays:OverlaySelector")
            self.served_overlays.choose(selector, batch.request)
        rows = self._rows(input_ids, batch, lookback_token_ids)
        x = expand_streams(m.embed(input_ids)[None], c.n_streams)  # [1, T, M, D]
        for block in m.blocks:
            x = block(x, positions, None if rows is None else rows.get(block.layer), self.history, batch)
        return m.norm(merge_streams(x))[0]

    def _rows(self, input_ids: torch.Tensor, batch: PagedBatch | None,
              lookback: torch.Tensor | None) -> dict[int, torch.Tensor] | None:
        """Every Engram layer's rows for the flat batch [1, T, H], hashed once from each
        token's own history, then prefetched (offloaded tables start reading now)."""
        m = self.model
        if m.hasher is None:
            return None
        cids_T = m.compression[input_ids]
        if batch is None:
            context_TC = cids_T.new_full((cids_T.shape[0], self.token_lookback_depth), m.hasher.pad_id)
        else:
            context_TC = self.history.ngram_context(batch, cids_T, lookback, lambda ids: m.compression[ids])
        rows, _ = m.hasher.hash_step(context_TC, cids_T[:, None], check=False)  # {layer: [T, 1, H]}
        rows = {layer: (torch.zeros_like(r) if self.config.engram.single_row else r).view(1, -1, r.shape[-1])
                for layer, r in rows.items()}
        for block in m.blocks:
            if block.engram is not None:
                block.engram.table.prefetch(rows[block.layer])
        return rows

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.model.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        loaded: set[str] = set()
        for name, weight in weights:
            if self.config.tie_embeddings and name == "model.lm_head.weight":
                continue
            if self.tables_offloaded and ".engram.table." in name:
                continue  # served from the offloaded folder
            if name in self.host_tables:  # rows into the host copy, never through the device
                self.host_tables[name].weight.copy_(weight)
                continue
            target, shard = name, None
            for ours, theirs, part in _STACKED:
                if ours in name and name.replace(ours, theirs) in params:
                    target, shard = name.replace(ours, theirs), part
                    break
            for ours, theirs in _RENAMED:
                if ours in target and target.replace(ours, theirs) in params:
                    target = target.replace(ours, theirs)
            if target in buffers:
                buffers[target].copy_(weight.to(buffers[target].dtype))
                continue
            if target not in params:
                raise ValueError(f"the folder has weight {name!r}, which this Engram model does not have; "
                                 "was it written by engram export-hf for this config?")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard is None:
                loader(param, weight)
            else:
                loader(param, weight, shard)
            loaded.add(target)
        if self.overlay_folders:
            self._load_overlays()  # each table now sits under its overlays: table.weight -> table.base.weight
            loaded = {n.replace(".engram.table.", ".engram.table.base.") for n in loaded}
        return loaded

    def _load_overlays(self) -> None:
        """Check each named overlay against the served tables (layout, parent, base rows) and
        put every Engram table under a `MixedOverlayTable` of them all."""
        from ..memory.overlay import Overlay, check_overlay
        from ..memory.overlay_mix import MixedOverlayTable

        blocks = {b.layer: b for b in self.model.blocks if b.engram is not None}
        tables = {layer: b.engram.table for layer, b in blocks.items()}
        parent = checkpoint_identity(self.vllm_config.model_config.model)
        names, loaded = list(self.overlay_folders), []
        for name in names:
            ov = Overlay.load(self.overlay_folders[name])
            check_overlay(ov, self.model.layout, tables, parent=parent)
            loaded.append(ov)
            logger.info("Engram overlay %r: %d rows from %s", name, ov.changed_rows, ov.path)
        mixed = []
        for layer, block in blocks.items():
            E = tables[layer].embedding_dim
            none = (torch.empty(0, dtype=torch.long), torch.empty(0, E))
            table = MixedOverlayTable(tables[layer], [ov.rows.get(layer, none) for ov in loaded])
            table.validate_rows = False
            block.engram.table = table
            mixed.append(table)
        self.served_overlays = ServedOverlays(names, mixed)
