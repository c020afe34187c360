"""EngramLM: token embedding -> blocks (Engram at configured layers) -> norm -> LM head.

Hashing of every Engram layer happens once per forward, before the blocks (or the data
pipeline passes `rows` in): the row ids depend only on the input ids, which is what makes
prefetching, offloading and exact decoding simple.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..hashing.layout import HashLayout
from ..hashing.ngram import NgramHasher
from ..memory.engram import ShortConvState
from .attention import KVCache
from .block import Block
from .hyper import expand_streams, merge_streams
from .moe import MoE
from .state import DecodeState


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, S, V]
    state: DecodeState | None  # the updated state when decoding (use_cache or a state given)
    intermediates: dict[str, Any] | None = None  # hidden_states, gates, rows (return_intermediates)
    table_wait_s: float = 0.0  # time Engram layers were blocked on offloaded rows (0 when resident)


class EngramLM(nn.Module):
    """A decoder-only LM with optional Engram memory, MoE and hyper-connections.

    `compression`: the tokenizer's compression table (original id -> compressed id), as a
    `CompressedTokenizer` or int array; None = identity (then the Engram config's
    compressed_vocab_size must equal vocab_size). `layout`: a saved `HashLayout` to use as is.
    Build on the meta device and call `init_weights()` after `to_empty()` for big configs.
    """

    def __init__(
        self, config: ModelConfig, *, compression: Any = None, layout: HashLayout | None = None,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        c, D = config, config.hidden_size
        self.hasher: NgramHasher | None = None
        table_sizes: dict[int, list[int]] = {}
        if c.engram is not None:
            e = c.engram
            table = np.arange(c.vocab_size) if compression is None else np.asarray(
                getattr(compression, "lookup_table", compression), dtype=np.int64)
            if table.shape != (c.vocab_size,) or int(table.max()) + 1 != e.compressed_vocab_size:
                raise ValueError(
                    f"compression table maps {table.shape[0]} ids onto {int(table.max()) + 1}, but the config "
                    f"has vocab_size={c.vocab_size} and engram.compressed_vocab_size={e.compressed_vocab_size}; "
                    "build the config from the CompressedTokenizer you pass"
                )
            if layout is None:
                layout = HashLayout.from_config(e)
            layout.check_matches(e, "the model's Engram config")
            self.hasher = NgramHasher.from_layout(layout)
            table_sizes = self.hasher.table_sizes
            if e.single_row:
                table_sizes = {layer: [1] * len(sizes) for layer, sizes in table_sizes.items()}
            self._compression_np = table
            self.register_buffer("compression", torch.empty(c.vocab_size, dtype=torch.int64, device=device))
        self.embed = nn.Embedding(c.vocab_size, D, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(
            Block(c, i, table_sizes=table_sizes.get(i), device=device, dtype=dtype) for i in range(c.n_layers))
        self.norm = nn.RMSNorm(D, eps=c.norm_eps, device=device, dtype=dtype)
        self.lm_head = nn.Linear(D, c.vocab_size, bias=False, device=device, dtype=dtype)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if not self.embed.weight.is_meta:
            self.init_weights()

    @property
    def layout(self) -> HashLayout | None:
        return None if self.hasher is None else self.hasher.layout

    @property
    def engram_layers(self) -> list[int]:
        return [] if self.config.engram is None else list(self.config.engram.layer_ids)

    # ---------------------------------------------------------------- initialization
    @torch.no_grad()
    def init_weights(self) -> None:
        """Every initialization in one place (call after `to_empty()` when built on meta):
        - embedding, attention q/k/v, MLP/expert gate & up, router, LM head: N(0, 0.02);
        - output projections (attention wo, MLP/expert down): N(0, 0.02 / sqrt(2 * n_layers)),
          GPT-2's scaling so the residual stream's variance does not grow with depth;
        - RMSNorm gains 1; MoE routing bias 0;
        - hyper-connections: see `HyperConnection.reset_parameters` (H_res starts near identity);
        - Engram: table N(0, 1); W_V and W_K N(0, 0.02 / sqrt(d_mem)), biases 0, so the value
          starts at the residual stream's scale (rms ~0.02) instead of nn.Linear's default,
          which made it ~15x larger than the embedding and drowned the stream at the start
          of training (docs/LOG.md); gate norms 1; short conv 0 (a new module starts as a
          plain gated add, PAPER.md step 6);
        - buffers: the compression table and the tables' offsets are filled in again.
        """
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if module is self:
                continue
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.blocks:
            for name, p in block.named_parameters():
                if name.startswith("engram.") or name.startswith("hc_"):
                    continue
                if p.dim() >= 2:
                    is_out = name.endswith(("wo.weight", "w_down.weight", "w_down"))
                    nn.init.normal_(p, std=out_std if is_out else std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.engram_layers:
            proj = self.blocks[layer].engram.proj
            nn.init.normal_(proj.weight, std=std / math.sqrt(self.config.engram.memory_dim))
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.hasher is not None:
            self.compression.copy_(torch.from_numpy(self._compression_np))

    # ---------------------------------------------------------------- decoding state
    def new_state(self, batch_size: int, device: torch.device | str | None = None) -> DecodeState:
        """An empty state: nothing cached, n-gram history all pad, conv history all zero."""
        device = device or self.embed.weight.device
        return DecodeState(
            kv=[KVCache() for _ in self.blocks],
            key_valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
            next_position=torch.zeros(batch_size, dtype=torch.long, device=device),
            ngram_history=None if self.hasher is None else self.hasher.initial_history(batch_size, device),
            conv={layer: ShortConvState() for layer in self.engram_layers},
        )

    def compress(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.compression[input_ids_BS]

    # ---------------------------------------------------------------- forward
    def forward(
        self, input_ids: torch.Tensor, state: DecodeState | None = None, *,
        valid: torch.Tensor | None = None, rows: dict[int, torch.Tensor] | None = None,
        use_cache: bool = False, return_intermediates: bool = False,
    ) -> LMOutput:
        """Logits for `input_ids` [B, S] (original token ids), continuing `state` if given.

        `valid` [B, S] bool marks real tokens (False = left padding in a batch of prompts of
        different lengths). `rows` = precomputed `hasher.hash(...)` from a data pipeline.
        With `use_cache=True` (or a state) the returned state continues the sequences.
        """
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"input_ids must be in [0, {c.vocab_size}), got values in [{lo}, {hi}]")
        if state is None and use_cache:
            state = self.new_state(B, input_ids.device)
        if state is not None and state.batch_size != B:
            raise ValueError(f"state holds {state.batch_size} sequences, input_ids has {B}")
        all_valid = valid is None or bool(valid.all())
        valid_BS = torch.ones(B, S, dtype=torch.bool, device=input_ids.device) if valid is None else valid.bool()

        # positions: each sequence counts only its real tokens
        start_B = state.next_position if state is not None else torch.zeros(B, dtype=torch.long, device=input_ids.device)
        positions_BS = (start_B.unsqueeze(1) + valid_BS.long().cumsum(1) - 1).clamp_min(0)
        # attention mask, only when padding is involved (else plain causal, cache-aligned)
        past_valid = state.key_valid if state is not None else valid_BS[:, :0]
        key_valid_BK = torch.cat([past_valid, valid_BS], dim=1)
        mask_BSK = None
        if not (all_valid and bool(past_valid.all())):
            P = past_valid.shape[1]
            causal_SK = torch.ones(S, P + S, dtype=torch.bool, device=input_ids.device).tril(P)
            k_idx = torch.arange(P + S, device=input_ids.device)
            self_SK = k_idx.unsqueeze(0) == (k_idx[P:].unsqueeze(1))  # every query sees itself (no empty rows)
            mask_BSK = (causal_SK & key_valid_BK.unsqueeze(1)) | self_SK

        # Engram addressing: all layers at once, before the blocks
        if self.hasher is not None:
            cids = torch.where(valid_BS, self.compress(input_ids), self.hasher.pad_id)  # pads read as "before start"
            if state is not None:
                step_rows, state.ngram_history = self.hasher.hash_step(state.ngram_history, cids)
                rows = rows if rows is not None else step_rows
            elif rows is None:
                rows = self.hasher.hash(cids)
            if c.engram.single_row:
                rows = {layer: torch.zeros_like(r) for layer, r in rows.items()}

        if rows is not None:  # offloaded tables start fetching now, while earlier blocks compute
            for layer in self.engram_layers:
                self.blocks[layer].engram.table.prefetch(rows[layer])

        x = expand_streams(self.embed(input_ids), c.n_branches)  # [B, S, M, D]
        inter = {"hidden_states": [], "gates": {}, "rows": rows} if return_intermediates else None
        for i, block in enumerate(self.blocks):
            record = {} if (inter is not None and block.engram is not None) else None
            x = block(
                x, positions_BS, rows_BTH=None if rows is None else rows.get(i),
                cache=None if state is None else state.kv[i], mask_BTK=mask_BSK,
                conv_state=None if state is None else state.conv.get(i),
                valid_BT=None if all_valid else valid_BS, record=record,
            )
            if inter is not None:
                inter["hidden_states"].append(merge_streams(x))
                if record:
                    inter["gates"][i] = record["gates"]
        logits = self.lm_head(self.norm(merge_streams(x)))
        if state is not None:
            state.key_valid = key_valid_BK
            state.next_position = start_B + valid_BS.long().sum(1)
        waited = sum(self.blocks[layer].engram.table.last_wait_s for layer in self.engram_layers)
        return LMOutput(logits=logits, state=state, intermediates=inter, table_wait_s=waited)

    def set_table(self, layer: int, table: nn.Module) -> None:
        """Serve Engram layer `layer` from another `MemoryTable` (host, disk, cached, ...)."""
        if layer not in self.engram_layers:
            raise ValueError(f"block {layer} has no Engram module; Engram layers are {self.engram_layers}")
        old = self.blocks[layer].engram.table
        if tuple(table.table_sizes) != tuple(old.table_sizes) or table.embedding_dim != old.embedding_dim:
            raise ValueError(
                f"table for layer {layer} has sizes {tuple(table.table_sizes)[:3]}... x {table.embedding_dim}, the "
                f"model needs {tuple(old.table_sizes)[:3]}... x {old.embedding_dim} (hash layout mismatch)")
        self.blocks[layer].engram.table = table

    # ---------------------------------------------------------------- training helpers
    def param_groups(self, lr: float, weight_decay: float = 0.1, table_lr_multiplier: float = 5.0,
                     table_weight_decay: float = 0.0) -> list[dict]:
        """Optimizer groups: Engram tables (paper: Adam, lr x5, no weight decay), backbone
        matrices (decayed), and vectors/scalars/embeddings (not decayed). Every parameter is
        in exactly one group (asserted)."""
        tables, decay, no_decay = [], [], []
        for name, p in self.named_parameters():
            if ".engram.table." in name:
                tables.append(p)
            elif p.dim() >= 2 and not name.startswith("embed.") and not name.endswith(".phi"):
                decay.append(p)
            else:  # norms, biases, hyper-connection maps and gains, token embedding
                no_decay.append(p)
        groups = [
            {"name": "backbone_decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
            {"name": "backbone_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
            {"name": "engram_tables", "params": tables, "lr": lr * table_lr_multiplier,
             "weight_decay": table_weight_decay},
        ]
        seen = [id(p) for g in groups for p in g["params"]]
        every = {id(p) for p in self.parameters()}
        assert len(seen) == len(set(seen)) and set(seen) == every, "a parameter is in no group or in two"
        return [g for g in groups if g["params"]]

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @torch.no_grad()
    def update_router_biases(self) -> dict[str, float]:
        """Auxiliary-loss-free balancing step for every MoE layer (call after optimizer.step())."""
        stats = [m.update_bias() for m in self.moe_layers()]
        if not stats:
            return {}
        return {"max_violation": max(s["max_violation"] for s in stats)}
