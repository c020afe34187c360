"""HF `Trainer` with the paper's table recipe: `EngramTrainer`'s optimizer groups, row-sparse
table updates, MoE balancing, against a plain `Trainer` on the same model."""

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import Trainer, TrainingArguments  # noqa: E402

from engram.hf import EngramForCausalLM  # noqa: E402
from engram.hf.trainer import EngramTrainer, OptimizerChain  # noqa: E402
from engram.train.optim import SparseRowAdam  # noqa: E402
from tests.tiny import build, small_config  # noqa: E402

pytestmark = pytest.mark.hf


class Texts(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 97, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-3, weight_decay=0.1, report_to=[], save_strategy="no",
                             logging_steps=1, disable_tqdm=True, use_cpu=True, **kw)


def groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def table_params(model):
    return {id(p) for n, p in model.named_parameters() if ".engram.table." in n}


def test_plain_trainer_decays_the_tables_and_engram_trainer_does_not(tmp_path):
    model = EngramForCausalLM.from_engram(build(small_config(moe=False)))
    plain = Trainer(model=model, args=args(tmp_path))
    plain.create_optimizer()
    decayed = {id(p) for g in plain.optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert table_params(model) <= decayed  # what the issue found: tables in AdamW with decay, at lr

    trainer = EngramTrainer(model=model, args=args(tmp_path), train_dataset=Texts())
    opt = trainer.create_optimizer()
    g = groups(opt)
    assert {id(p) for p in g["engram_tables"]["params"]} == table_params(model)
    assert g["engram_tables"]["lr"] == pytest.approx(5e-3) and g["engram_tables"]["weight_decay"] == 0.0
    assert g["backbone_decay"]["lr"] == pytest.approx(1e-3) and g["backbone_decay"]["weight_decay"] == 0.1
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n and "engram" not in n}
    assert norms <= {id(p) for p in g["backbone_no_decay"]["params"]}
    every = [id(p) for group in opt.param_groups for p in group["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters()) and len(every) == len(set(every))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.lr_scheduler.get_last_lr()[-1] == pytest.approx(5 * trainer.lr_scheduler.get_last_lr()[0])
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if ".engram.table." in n)


def test_row_sparse_tables_touch_only_the_rows_read_and_moe_balances(tmp_path):
    config = small_config(moe=True)
    config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, rows_per_head=(1009, 1013)))
    model = EngramForCausalLM.from_engram(build(config))
    data = Texts()
    trainer = EngramTrainer(model=model, args=args(tmp_path, max_grad_norm=1.0), train_dataset=data,
                            table_optimizer="row_adam")
    opt = trainer.create_optimizer()
    assert isinstance(opt, OptimizerChain) and isinstance(opt.optimizers[1], SparseRowAdam)
    inner = model.model
    layer = inner.engram_layers[0]
    table = inner.blocks[layer].engram.table
    before, bias = table.weight.detach().clone(), inner.moe_layers()[0].router_bias.clone()
    trainer.train()
    read = torch.zeros(table.weight.shape[0], dtype=torch.bool)
    rows = inner.hasher.hash(inner.compress(data.ids), check=False)[layer]  # all the rows the data can read
    read[(rows + table.offsets).flatten()] = True
    assert read.float().mean() < 0.3
    changed = (table.weight.detach() != before).any(1)
    assert changed.any() and not bool((changed & ~read).any())  # no row outside those read moved
    steps = opt.optimizers[1].state[table.weight]["step"]  # per-row step counts: untouched rows never counted
    assert table.sparse and int(steps.max()) > 0 and not bool(steps[~read].any())
    assert not torch.equal(inner.moe_layers()[0].router_bias, bias)  # the balancing step ran
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for h in trainer.state.log_history if "grad_norm" in h)


def test_sparse_tables_need_a_native_model(tmp_path):
    from engram.hf.trainer import engram_optimizer

    with pytest.raises(ValueError, match="needs an EngramForCausalLM"):
        engram_optimizer(torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.0, decay_names=set(),
                         table_optimizer="row_adam")
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        EngramTrainer(model=EngramForCausalLM.from_engram(build(small_config())), args=args(tmp_path),
                      table_optimizer="sgd")
