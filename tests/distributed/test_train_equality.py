"""W ranks on a batch split W ways take the same steps as one process on the whole batch:
DDP and FSDP2 backbones, sharded tables under each table optimizer, MoE loads summed."""

import pytest
import torch

from .launch import run_ranks

GLOBAL_BATCH, SEQ = 4, 12
LR = 3e-3


def config(moe: bool = True):
    from engram.config import EngramConfig, ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=97, hidden_size=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, n_streams=2,
        max_seq_len=64, moe=None if not moe else MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden_size=16,
                                      first_k_dense=1, bias_update_rate=1e-2),
        engram=EngramConfig(compressed_vocab_size=97, pad_id=0, layer_ids=(1, 2), rows_per_head=(101, 103),
                            n_head_per_ngram=2, n_embed_per_ngram=16, conv_zero_init=False))


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 97, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1000 + step))


def build(table_optimizer: str, dtype, moe: bool = True):
    from engram import EngramLM

    torch.manual_seed(0)
    return EngramLM(config(moe=moe)).use_sparse_table_grads(table_optimizer != "adam").to(dtype)


def state_of(model, optimizers, tables) -> dict:
    """Full weights (FSDP2 shards gathered), each sharded table's slice with its rows, and the
    table optimizer's state of each slice."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        out[name] = p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
    for layer, t in (tables or {}).items():
        out[f"rows.{layer}"] = torch.tensor([t.row_start, t.row_end])
        for key, value in optimizers[-1].state[t.weight].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                out[f"table_state.{layer}.{key}"] = value.clone()
    return out


def _train(rank, world_size, fsdp, table_optimizer, dtype_name, steps, grad_accum, moe=True):
    from engram.distributed import parallelize
    from engram.train.trainer import train_step
    from engram.train.optim import build_optimizers

    dtype = getattr(torch, dtype_name)
    model = build(table_optimizer, dtype, moe)
    parallel = parallelize(model, fsdp=fsdp)
    optimizers = build_optimizers(model, lr=LR, table_optimizer=table_optimizer)
    share = GLOBAL_BATCH // world_size
    log = []
    for step in range(steps):
        ids = batch(step)[rank * share:(rank + 1) * share]
        r = train_step(model, optimizers, ids, grad_accum=grad_accum, grad_clip=0.5, parallel=parallel)
        log.append((r.loss, r.grad_norm, r.skipped))
    return {"log": log, "state": state_of(model, optimizers, parallel.tables)}


def reference(table_optimizer, dtype, steps, moe=True, grad_accum=1):
    from engram.train.trainer import train_step
    from engram.train.optim import build_optimizers

    model = build(table_optimizer, dtype, moe)
    optimizers = build_optimizers(model, lr=LR, table_optimizer=table_optimizer)
    log = [train_step(model, optimizers, batch(step), grad_accum=grad_accum, grad_clip=0.5) for step in range(steps)]
    tables = {layer: model.blocks[layer].engram.table for layer in model.engram_layers}
    state = {name: p.detach() for name, p in model.named_parameters()}
    for layer, t in tables.items():
        for key, value in optimizers[-1].state[t.weight].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                state[f"table_state.{layer}.{key}"] = value
    return [(r.loss, r.grad_norm, r.skipped) for r in log], state


def check(results, ref_log, ref_state, tol):
    for rank, res in enumerate(results):
        for (loss, norm, skipped), (rl, rn, rs) in zip(res["log"], ref_log):
            assert not skipped and not rs
            assert abs(loss - rl) <= tol * max(1, abs(rl)), f"rank {rank}: loss {loss} vs {rl}"
            assert abs(norm - rn) <= tol * max(1, abs(rn)), f"rank {rank}: grad norm {norm} vs {rn}"
        state = res["state"]
        for name, ref in ref_state.items():
            if name.startswith("table_state."):
                layer = name.split(".")[1]
                start, end = state[f"rows.{layer}"].tolist()
                ref, got = ref[start:end], state[name]
            elif name.endswith("engram.table.weight"):
                layer = name.split(".")[1]
                start, end = state[f"rows.{layer}"].tolist()
                ref, got = ref[start:end], state[name]
            else:
                got = state[name]
            err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
            assert err <= tol, f"rank {rank}: {name} differs by {err}"


@pytest.mark.parametrize("fsdp, table_optimizer, grad_accum", [
    (False, "sparse_adam", 1),
    (True, "adam", 2),
])
def test_two_ranks_equal_one_process_in_float64(fsdp, table_optimizer, grad_accum):
    steps = 3
    results = run_ranks(_train, 2, fsdp, table_optimizer, "float64", steps, grad_accum, timeout=180)
    ref_log, ref_state = reference(table_optimizer, torch.float64, steps)
    check(results, ref_log, ref_state, tol=1e-12)


def max_error(results, ref_state) -> float:
    """The largest difference of any weight or table state on any rank from `ref_state`."""
    worst = 0.0
    for res in results:
        state = res["state"]
        for name, ref in ref_state.items():
            if name.startswith("table_state.") or name.endswith("engram.table.weight"):
                start, end = state[f"rows.{name.split('.')[1]}"].tolist()
                ref = ref[start:end]
            if ref.numel():
                worst = max(worst, (state[name].double() - ref.double()).abs().max().item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("fsdp", [False, True])
@pytest.mark.parametrize("table_optimizer", ["adam", "sparse_adam", "row_adam"])
def test_ranks_equal_one_process_in_float32_over_20_steps(world_size, fsdp, table_optimizer):
    """float32, without MoE (a near-tie in a token's top-k routes differently once sums are
    ordered differently, then the balancing biases drift; MoE is held to float64 above).

    In float32 this model's training amplifies rounding noise ~3x a step (row_adam faster): one
    process run with 2 micro-batches instead of 1 (the same sums, ordered differently) ends 20
    steps ~4e-2 away from itself (measured; docs/LOG.md), so 1e-5 after 20 steps holds for no
    reordering at all. The ranks must stay as close to one process as that process stays to
    itself under another micro-batch split: over all steps (loss, gradient norm) and at the end
    (every weight and table state), with x3 headroom plus 1e-5."""
    steps = 20
    results = run_ranks(_train, world_size, fsdp, table_optimizer, "float32", steps, 1, False, timeout=600)
    ref_log, ref_state = reference(table_optimizer, torch.float32, steps, moe=False)
    split_log, split_state = reference(table_optimizer, torch.float32, steps, moe=False, grad_accum=2)
    for i, what in enumerate(("loss", "gradient norm")):
        noise = max(abs(s[i] - r[i]) for s, r in zip(split_log, ref_log))
        for res in results:
            err = max(abs(d[i] - r[i]) for d, r in zip(res["log"], ref_log))
            assert err <= 3 * noise + 1e-5, f"{what}: ranks {err:.2e} from one process, its split noise {noise:.2e}"
    spread = max((split_state[k].double() - ref_state[k].double()).abs().max().item() for k in ref_state)
    err = max_error(results, ref_state)
    assert err <= 3 * spread + 1e-5, f"ranks end {err:.2e} from one process; its own split spread is {spread:.2e}"
