"""`EngramTrainer`: transformers' `Trainer` with the paper's recipe for the Engram tables.

A plain `Trainer` puts every parameter in one AdamW with weight decay, tables included. The
paper trains the tables with Adam at 5x the backbone's learning rate and no weight decay
(docs/paper.md, "Training recipe"). `EngramTrainer` builds exactly that for `EngramForCausalLM`
and for models with a retrofitted Engram adapter (PEFT-wrapped ones too):

    trainer = EngramTrainer(model=model, args=TrainingArguments(...), train_dataset=...)

- backbone: AdamW at `args.learning_rate`, decayed as `Trainer` decays (not norms, not biases);
- tables: lr x `table_lr_multiplier`, weight decay 0, with `table_optimizer`:
  "adam" (dense gradients, in the same AdamW), or "sparse_adam" / "row_adam" (row-sparse
  gradients and engram's `SparseRowAdam`: only the rows a step read are touched; native
  models only). Gradient clipping then handles the sparse gradients (engram's `clip_grad_norm`);
- MoE models: the routing biases take their auxiliary-loss-free balancing step after every
  optimizer step, as `engram train` does.
"""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from ..train.optim import TABLE_OPTIMIZERS, SparseRowAdam, clip_grad_norm, closure_loss


def is_table(name: str) -> bool:
    """An Engram table's parameter: `...engram.table.weight` (native) or a retrofitted adapter's
    `engram_adapter. ... .table.weight` (under any wrapper's prefix)."""
    return ".table." in name and ("engram." in name or "engram_adapter." in name)


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers stepped as one, for a `Trainer` and its LR scheduler that take one:
    `param_groups` are the inner optimizers' own group dicts, so a scheduler's learning rates
    reach them; state dicts are the inner ones, in order."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:  # noqa: the groups are the inner ones'
        self.optimizers = list(optimizers)
        self.defaults = {}
        self.param_groups = [g for o in self.optimizers for g in o.param_groups]
        for hooks in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                      "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                      "_optimizer_load_state_dict_post_hooks"):
            setattr(self, hooks, {})

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the saved optimizer chain has {len(saved)} optimizers, this one {len(self.optimizers)}")
        for o, s in zip(self.optimizers, saved):
            o.load_state_dict(s)

    def add_param_group(self, param_group: dict) -> None:
        raise TypeError("add the group to one of OptimizerChain.optimizers")


def engram_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, decay_names: set[str],
                     betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, table_lr_multiplier: float = 5.0,
                     table_optimizer: str = "adam") -> torch.optim.Optimizer:
    """The optimizer `EngramTrainer` builds: trainable parameters only; `decay_names` are the
    backbone parameters that take weight decay (Trainer's choice)."""
    if table_optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"table_optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {table_optimizer!r}")
    sparse = table_optimizer != "adam"
    if sparse:
        inner = getattr(model, "model", None)
        if not hasattr(inner, "use_sparse_table_grads"):
            raise ValueError(f"table_optimizer={table_optimizer!r} (row-sparse updates) needs an EngramForCausalLM; "
                             f"{type(model).__name__} has no sparse tables: use table_optimizer='adam'")
        inner.use_sparse_table_grads(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    tables = [p for n, p in named if is_table(n)]
    decay = [p for n, p in named if not is_table(n) and n in decay_names]
    rest = [p for n, p in named if not is_table(n) and n not in decay_names]
    backbone = [{"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "backbone_decay"},
                {"params": rest, "lr": lr, "weight_decay": 0.0, "name": "backbone_no_decay"}]
    table_group = {"params": tables, "lr": lr * table_lr_multiplier, "weight_decay": 0.0, "name": "engram_tables"}
    backbone = [g for g in backbone if g["params"]]
    if not sparse or not tables:
        groups = backbone + ([table_group] if tables else [])
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    moments = "full" if table_optimizer == "sparse_adam" else "row"
    tables_opt = SparseRowAdam([table_group], lr=table_group["lr"], betas=betas, eps=eps, moments=moments)
    if not backbone:
        return tables_opt
    return OptimizerChain([torch.optim.AdamW(backbone, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay),
                           tables_opt])


class _BalanceRouters(TrainerCallback):
    """The MoE routing biases' balancing step after each optimizer step."""

    def __init__(self, trainer: "EngramTrainer") -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        inner = getattr(self.trainer.model, "model", None)
        if hasattr(inner, "update_router_biases"):
            inner.update_router_biases()


class EngramTrainer(Trainer):
    """`Trainer` with the paper's table recipe (module docstring). Extra arguments:
    `table_lr_multiplier` (5.0) and `table_optimizer` ("adam", "sparse_adam", "row_adam")."""

    def __init__(self, *args, table_lr_multiplier: float = 5.0, table_optimizer: str = "adam", **kwargs) -> None:
        if table_optimizer not in TABLE_OPTIMIZERS:
            raise ValueError(f"table_optimizer must be one of {', '.join(TABLE_OPTIMIZERS)}, got {table_optimizer!r}")
        self.table_lr_multiplier, self.table_optimizer = table_lr_multiplier, table_optimizer
        super().__init__(*args, **kwargs)
        self.add_callback(_BalanceRouters(self))

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            a = self.args
            self.optimizer = engram_optimizer(
                opt_model, lr=a.learning_rate, weight_decay=a.weight_decay,
                decay_names=set(self.get_decay_parameter_names(opt_model)), betas=(a.adam_beta1, a.adam_beta2),
                eps=a.adam_epsilon, table_lr_multiplier=self.table_lr_multiplier,
                table_optimizer=self.table_optimizer)
        return self.optimizer

    def _clip_grad_norm(self, model):
        """Trainer's clipping, except with row-sparse table gradients (which torch's
        `clip_grad_norm_` cannot take): engram's `clip_grad_norm`, after unscaling."""
        if self.table_optimizer == "adam":
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return torch.tensor(clip_grad_norm(list(model.parameters()), self.args.max_grad_norm))

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None and self.table_optimizer != "adam":  # no clipping asked: the norm alone
            grad_norm = torch.tensor(clip_grad_norm(list(model.parameters()), float("inf")))
        return super()._get_grad_norm(model, grad_norm=grad_norm)
