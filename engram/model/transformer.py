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
from .block import Block
from .hyper import expand_streams, merge_streams
from .moe import MoE
from .rope import rope_angles
from .state import DecodeState, padding_mask, token_positions


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
        for layer in self.engram_layers:  # rows come from the model's own hasher: never re-checked
            self.blocks[layer].engram.table.validate_rows = False
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
        - Engram: `Engram.reset_parameters`, once per module (its table is drawn once): table
          N(0, table_init_std^2) (0 by default: zero rows, so an unread row adds nothing);
          W_V and W_K N(0, 0.02 / sqrt(d_mem)), biases 0, so with N(0, 1) rows the value starts at
          the residual stream's scale (docs/LOG.md: nn.Linear's default cost 0.65 nats); gate norms 1; short conv 0 (a new module starts as a plain gated
          add, docs/paper.md step 6);
        - buffers: the compression table and the tables' offsets are filled in again.
        """
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layers)
        # an Engram module initializes its own children (table, projection, norms, conv)
        inside_engram = {id(m) for b in self.blocks if b.engram is not None
                         for m in b.engram.modules() if m is not b.engram}
        for module in self.modules():
            if module is self or id(module) in inside_engram:
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
        if self.hasher is not None:
            self.compression.copy_(torch.from_numpy(self._compression_np))

    # ---------------------------------------------------------------- decoding state
    def new_state(self, batch_size: int, device: torch.device | str | None = None, *,
                  max_len: int | None = None) -> DecodeState:
        """An empty state for up to `max_len` positions (default `config.max_seq_len`; padding of
        a left-padded prompt counts): KV caches of that capacity, allocated once and zeroed,
        nothing written, n-gram history all pad, conv history all zero."""
        c = self.config
        C = c.max_seq_len if max_len is None else int(max_len)
        if not 1 <= C <= c.max_seq_len:
            raise ValueError(f"max_len must be in [1, max_seq_len={c.max_seq_len}], got {max_len}; "
                             "shorten the input or build the model with a larger max_seq_len")
        device = device or self.embed.weight.device
        convs = {layer: self.blocks[layer].engram.short_conv for layer in self.engram_layers}
        return DecodeState.allocate(
            batch_size=batch_size, capacity=C, kv_heads=[(b.attn.n_kv_heads, b.attn.head_dim) for b in self.blocks],
            conv_shapes={layer: None if sc is None else (sc.context, sc.n_streams * sc.dim)
                         for layer, sc in convs.items()},
            ngram_history=None if self.hasher is None else self.hasher.initial_history(batch_size, device),
            dtype=self.embed.weight.dtype, device=device)

    def compress(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        return self.compression[input_ids_BS]

    def _rows_read(self, rows: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The rows the tables are read at: the hashed rows, or row 0 of each head for capacity 1."""
        if self.config.engram.single_row:
            return {layer: torch.zeros_like(r) for layer, r in rows.items()}
        return rows

    def engram_rows(self, input_ids_BS: torch.Tensor) -> dict[int, torch.Tensor]:
        """{layer: row ids [B, S, H]} each Engram layer reads for whole sequences of `input_ids`
        (as `forward` does without a decode state or padding)."""
        if self.hasher is None:
            raise ValueError("the model has no Engram layers, so it reads no rows")
        return self._rows_read(self.hasher.hash(self.compress(input_ids_BS), check=False))

    def _chunk_rows(self, input_ids_BS: torch.Tensor, valid_BS: torch.Tensor | None, state: DecodeState | None,
                    rows: dict[int, torch.Tensor] | None) -> dict[int, torch.Tensor] | None:
        """Engram addressing of one forward, all layers at once, before the blocks: the given
        `rows`, or the hashed ones (a state's n-gram history moves on either way). The ids are
        compressed by construction (ids were checked at the boundary), so nothing is checked."""
        if rows is not None:
            rows = {layer: r.to(input_ids_BS.device) for layer, r in rows.items()}
        if self.hasher is None:
            return rows
        cids_BS = self.compress(input_ids_BS)
        if valid_BS is not None:
            cids_BS = torch.where(valid_BS, cids_BS, self.hasher.pad_id)  # pads read as "before start"
        if state is not None:
            step_rows = state.hash_chunk(self.hasher, cids_BS)
            rows = rows if rows is not None else step_rows
        elif rows is None:
            rows = self.hasher.hash(cids_BS, check=False)
        return self._rows_read(rows)

    # ---------------------------------------------------------------- input validation
    def check_inputs(
        self, input_ids: torch.Tensor, *, valid: torch.Tensor | None = None, state: DecodeState | None = None,
        rows: dict[int, torch.Tensor] | None = None, new_positions: int = 0,
    ) -> None:
        """Validate inputs once, at the API boundary (generate, the CLI, a data loader), so that
        `forward` needs no host syncs: ids must be in [0, vocab_size) (an out-of-range id is an
        index error on a CPU and a device assert on a GPU inside forward), the sequence must fit
        `max_seq_len` or the state's capacity (plus `new_positions` to be decoded after it), and
        precomputed `rows` must be in range for every table. Costs one or two host syncs."""
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        B, S = input_ids.shape
        if input_ids.numel():
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"input_ids must be in [0, {c.vocab_size}), got values in [{lo}, {hi}]")
        if valid is not None and tuple(valid.shape) != (B, S):
            raise ValueError(f"valid must be [batch, time] = {(B, S)} like input_ids, got {tuple(valid.shape)}")
        if state is None:
            used, room, what = 0, c.max_seq_len, f"max_seq_len={c.max_seq_len}"
        else:
            if state.batch_size != B:
                raise ValueError(f"state holds {state.batch_size} sequences, input_ids has {B}")
            used = int(state.length) if state.written is None else state.written
            room, what = state.capacity, f"the decode state's capacity {state.capacity}"
        if used + S + new_positions > room:
            raise ValueError(
                f"input longer than {what}: {used} positions held + {S} given + {new_positions} to decode "
                f"= {used + S + new_positions}; shorten the input (or prompt + max_new_tokens), or use "
                "new_state(batch, max_len=...) up to config.max_seq_len")
        for layer, rows_BTH in (rows or {}).items():
            if layer not in self.engram_layers:
                raise ValueError(f"rows given for block {layer}, which has no Engram module "
                                 f"(Engram layers: {self.engram_layers})")
            if tuple(rows_BTH.shape[:2]) != (B, S):
                raise ValueError(f"rows[{layer}] must be [batch, time, H] matching input_ids {(B, S)}, "
                                 f"got {tuple(rows_BTH.shape)}")
            self.blocks[layer].engram.table.check_rows(rows_BTH.to(input_ids.device))
        if rows is not None and set(rows) != set(self.engram_layers):
            raise ValueError(f"rows must have every Engram layer {self.engram_layers}, got {sorted(rows)}")

    # ---------------------------------------------------------------- forward
    def forward(
        self, input_ids: torch.Tensor, state: DecodeState | None = None, *,
        valid: torch.Tensor | None = None, rows: dict[int, torch.Tensor] | None = None,
        use_cache: bool = False, return_intermediates: bool = False,
    ) -> LMOutput:
        """Logits for `input_ids` [B, S] (original token ids), continuing `state` if given.

        `valid` [B, S] bool marks real tokens (False = left padding in a batch of prompts of
        different lengths). `rows` = precomputed `hasher.hash(...)` from a data pipeline.
        With `use_cache=True` (or a state) the returned state continues the sequences; the
        state is updated in place.

        No host syncs and no data-dependent branches, so `torch.compile(model, fullgraph=True)`
        traces the training forward and a decode step whole: values are not checked here
        (call `check_inputs` once at the boundary); only shapes are.
        """
        c = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if state is None and use_cache:
            state = self.new_state(B, input_ids.device)
        if state is None and S > c.max_seq_len:
            raise ValueError(f"input longer than max_seq_len: {S} > {c.max_seq_len} positions; split it "
                             "into windows of at most max_seq_len, or build the model with a larger max_seq_len")
        valid_BS = None if valid is None else valid.to(torch.bool)

        # positions (real tokens only) and the attention mask; a state also takes the cache columns
        if state is None:
            positions_BS = token_positions(valid_BS, B, S, input_ids.device)
            mask_BSK = padding_mask(valid_BS)
        else:
            positions_BS, mask_BSK = state.begin_chunk(B, S, valid_BS)

        rows = self._chunk_rows(input_ids, valid_BS, state, rows)
        if rows is not None:  # offloaded tables start fetching now, while earlier blocks compute
            for layer in self.engram_layers:
                self.blocks[layer].engram.table.prefetch(rows[layer])

        rope = rope_angles(positions_BS, c.attn_head_dim, c.rope_theta)  # once for every block
        embedded = self.embed(input_ids)
        x = expand_streams(embedded, c.n_streams)  # [B, S, M, D]
        inter = {"hidden_states": [], "gates": {}, "rows": rows, "embeddings": embedded} if return_intermediates else None
        for i, block in enumerate(self.blocks):
            record = {} if (inter is not None and block.engram is not None) else None
            x = block(
                x, rope, rows_BTH=None if rows is None else rows.get(i),
                cache=None if state is None else state.kv[i], mask_BTK=mask_BSK,
                conv_state=None if state is None else state.conv.get(i),
                valid_BT=valid_BS, record=record,
            )
            if inter is not None:
                inter["hidden_states"].append(merge_streams(x))
                if record:
                    inter["gates"][i] = record["gates"]
        final = self.norm(merge_streams(x))
        if inter is not None:
            inter["final_norm"] = final
        logits = self.lm_head(final)
        if state is not None:
            state.end_chunk(S, valid_BS)
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
        table.validate_rows = False  # the model's rows come from its hasher (user rows: check_inputs)
        self.blocks[layer].engram.table = table

    # ---------------------------------------------------------------- training helpers
    def use_sparse_table_grads(self, on: bool = True) -> "EngramLM":
        """Give the Engram tables row-sparse gradients (only the rows a step read) or dense
        ones. The table optimizer decides: a row-sparse Adam takes sparse gradients, and
        torch.optim.Adam needs dense ones. Tables without gradients (host, disk, quantized)
        are left as they are."""
        for layer in self.engram_layers:
            table = self.blocks[layer].engram.table
            if hasattr(table, "sparse"):
                table.sparse = on
        return self

    @property
    def sparse_table_grads(self) -> bool:
        """Whether any Engram table makes row-sparse gradients (`use_sparse_table_grads`)."""
        return any(getattr(self.blocks[layer].engram.table, "sparse", False) for layer in self.engram_layers)

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
