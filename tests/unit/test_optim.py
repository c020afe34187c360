"""SparseRowAdam against dense Adam and against its documented formulas; build_optimizers; clipping."""

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from engram import EngramLM, presets
from engram.train.optim import Float32StateAdam, SparseRowAdam, build_optimizers, clip_grad_norm, coalesce

HP = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-8)


def set_grad(weight, ids, grad_out, sparse=True):
    """weight.grad as F.embedding's backward makes it (sparse COO, uncoalesced, or dense)."""
    weight.grad = None
    F.embedding(ids, weight, sparse=sparse).backward(grad_out)


def draws(R, steps, n, rows=None):
    """Per step: random row ids (with repeats) drawn from `rows` (default all R)."""
    pool = torch.arange(R) if rows is None else rows
    return [pool[torch.randint(0, len(pool), (n,))] for _ in range(steps)]


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_full_equals_torch_adam_when_every_row_is_touched(rng, wd):
    R, E = 7, 5
    w0 = torch.randn(R, E)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = SparseRowAdam([ours], weight_decay=wd, moments="full", **HP)
    dense = (torch.optim.AdamW if wd else torch.optim.Adam)([ref], weight_decay=wd, **HP)
    for _ in range(5):
        ids = torch.cat([torch.randperm(R), torch.randint(0, R, (9,))])  # every row, some twice
        grad_out = torch.randn(len(ids), E)
        set_grad(ours, ids, grad_out, sparse=True)
        set_grad(ref, ids, grad_out, sparse=False)
        opt.step()
        dense.step()
    assert max_diff(ours, ref) < 1e-6, max_diff(ours, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert max_diff(opt.state[ours][key], dense.state[ref][key]) < 1e-6, key
    assert torch.equal(opt.state[ours]["step"], torch.full((R,), 5, dtype=torch.int32))


def reference(w0, steps, moments, lr, betas, eps, wd):
    """The documented update, one row at a time, only at the steps the row is touched."""
    b1, b2 = betas
    w = w0.clone().double()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    k = [0] * w.shape[0]
    for ids, grad_out in steps:
        g_full = torch.zeros_like(w).index_add_(0, ids, grad_out.double())
        for r in ids.unique().tolist():
            g, k[r] = g_full[r], k[r] + 1
            w[r] *= 1 - lr * wd
            m[r] = b1 * m[r] + (1 - b1) * g
            v[r] = b2 * v[r] + (1 - b2) * (g**2 if moments == "full" else (g**2).mean())
            w[r] -= lr / (1 - b1 ** k[r]) * m[r] / (v[r].sqrt() / (1 - b2 ** k[r]) ** 0.5 + eps)
    return w, m, v, torch.tensor(k, dtype=torch.int32)


@pytest.mark.parametrize("moments", ["full", "row"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_partial_touches_follow_the_per_row_formula(rng, moments, wd):
    R, E = 16, 4
    w0 = torch.randn(R, E)
    p = torch.nn.Parameter(w0.clone())
    opt = SparseRowAdam([p], weight_decay=wd, moments=moments, **HP)
    steps = [(ids, torch.randn(len(ids), E)) for ids in draws(R, 6, 5, rows=torch.arange(R - 3))]  # 3 never
    for ids, grad_out in steps:
        before = p.detach().clone()
        state_before = {k: v.clone() for k, v in opt.state[p].items()}
        set_grad(p, ids, grad_out)
        opt.step()
        untouched = torch.ones(R, dtype=torch.bool)
        untouched[ids] = False
        assert torch.equal(p[untouched], before[untouched])  # weight decay too: touched rows only
        for key, old in state_before.items():
            assert torch.equal(opt.state[p][key][untouched], old[untouched]), key
    w, m, v, k = reference(w0, steps, moments, wd=wd, **HP)
    v = v if moments == "full" else v[:, 0]
    assert opt.state[p]["exp_avg_sq"].shape == v.shape
    assert torch.equal(opt.state[p]["step"], k)
    assert torch.equal(p[-3:], w0[-3:])
    for name, ours, ref in [("w", p, w), ("m", opt.state[p]["exp_avg"], m), ("v", opt.state[p]["exp_avg_sq"], v)]:
        assert max_diff(ours, ref) < 1e-5, (name, max_diff(ours, ref))


def test_row_mode_with_one_column_is_full_mode(rng):
    w0 = torch.randn(9, 1)
    ps = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    opts = [SparseRowAdam([p], moments=m, **HP) for p, m in zip(ps, ["full", "row"])]
    for ids in draws(9, 4, 6):
        grad_out = torch.randn(len(ids), 1)
        for p, opt in zip(ps, opts):
            set_grad(p, ids, grad_out)
            opt.step()
    assert max_diff(ps[0], ps[1]) < 1e-7


def test_fast_coalesce_equals_torch_coalesce(rng):
    w = torch.nn.Parameter(torch.randn(50, 3))
    ids = (torch.rand(400) ** 3 * 50).long()  # many repeats
    F.embedding(ids, w, sparse=True).backward(torch.randn(400, 3))
    ours, ref = coalesce(w.grad), w.grad.coalesce()
    assert ours.is_coalesced() and torch.equal(ours.indices(), ref.indices())
    # sums of up to ~100 float32 terms, added in another order: equal up to rounding
    assert torch.allclose(ours.values(), ref.values(), rtol=1e-5, atol=1e-4), max_diff(ours.values(), ref.values())


@pytest.mark.parametrize("moments", ["full", "row"])
def test_dense_gradient_equals_the_sparse_one(rng, moments):
    R, E = 12, 3
    w0 = torch.randn(R, E)
    ps = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    opts = [SparseRowAdam([p], moments=moments, weight_decay=0.05, **HP) for p in ps]
    for ids in draws(R, 4, 6):
        grad_out = torch.randn(len(ids), E)
        set_grad(ps[0], ids, grad_out, sparse=True)
        ps[1].grad = coalesce(ps[0].grad).to_dense()  # the same sums, in the same order
        for opt in opts:
            opt.step()
    assert torch.equal(ps[0], ps[1]), max_diff(ps[0], ps[1])
    for key in opts[0].state[ps[0]]:
        assert torch.equal(opts[0].state[ps[0]][key], opts[1].state[ps[1]][key]), key


@pytest.mark.parametrize("moments", ["full", "row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_identically(rng, moments, dtype):
    R, E = 10, 4
    w0 = torch.randn(R, E).to(dtype)
    steps = [(ids, torch.randn(len(ids), E, dtype=dtype)) for ids in draws(R, 5, 4)]

    def run(p, opt, part):
        for ids, grad_out in part:
            set_grad(p, ids, grad_out)
            opt.step()

    straight = torch.nn.Parameter(w0.clone())
    opt = SparseRowAdam([straight], moments=moments, weight_decay=0.1, **HP)
    run(straight, opt, steps)

    first = torch.nn.Parameter(w0.clone())
    opt1 = SparseRowAdam([first], moments=moments, weight_decay=0.1, **HP)
    run(first, opt1, steps[:3])
    buf = io.BytesIO()
    torch.save(opt1.state_dict(), buf)
    buf.seek(0)
    resumed = torch.nn.Parameter(first.detach().clone())
    opt2 = SparseRowAdam([resumed], moments=moments, **HP)  # hyper-parameters come from the state dict
    opt2.load_state_dict(torch.load(buf))
    assert opt2.state[resumed]["exp_avg"].dtype == torch.float32  # not cast to the table's dtype
    run(resumed, opt2, steps[3:])
    assert torch.equal(resumed, straight)
    for key in opt.state[straight]:
        assert torch.equal(opt2.state[resumed][key], opt.state[straight][key]), key


def test_bfloat16_tables_are_updated_in_float32(rng):
    w0 = torch.randn(8, 4)
    p32, p16 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.to(torch.bfloat16))
    opts = [SparseRowAdam([p], **HP) for p in (p32, p16)]
    ids, grad_out = torch.tensor([1, 1, 5]), torch.randn(3, 4)
    set_grad(p32, ids, grad_out)
    set_grad(p16, ids, grad_out.to(torch.bfloat16))
    for opt in opts:
        opt.step()
    assert p16.dtype == torch.bfloat16 and opts[1].state[p16]["exp_avg"].dtype == torch.float32
    assert max_diff(p16, p32) < 0.05  # bfloat16 rounding of the weights and the gradient only


def test_bfloat16_duplicates_are_summed_in_float32():
    """A row read 64 times: its gradient is the float32 sum rounded once to bfloat16, not 63
    bfloat16 additions (which drift by ~64 * 2^-9 relative)."""
    w = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.bfloat16))
    grad_out = torch.randn(64, 8)
    F.embedding(torch.full((64,), 2), w, sparse=True).backward(grad_out.to(torch.bfloat16))
    summed = coalesce(w.grad)
    assert summed.dtype == torch.bfloat16 and summed.indices().tolist() == [[2]]
    expected = grad_out.to(torch.bfloat16).float().sum(0).to(torch.bfloat16)
    assert torch.equal(summed.values()[0], expected)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_float32_state_adam_is_torch_adam_for_float32(rng, wd):
    """For float32 parameters: torch.optim.Adam(foreach=False) operation for operation, so equal
    bit for bit; chunking the rows changes nothing."""
    w0 = torch.randn(37, 5)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Float32StateAdam([ours], weight_decay=wd, chunk_rows=8, **HP)
    dense = torch.optim.Adam([ref], weight_decay=wd, foreach=False, **HP)
    for _ in range(6):
        g = torch.randn(37, 5)
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        dense.step()
    assert torch.equal(ours, ref), max_diff(ours, ref)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(opt.state[ours][key], dense.state[ref][key]), key


def test_float32_state_adam_rounds_bfloat16_once_per_step(rng):
    """bfloat16 parameter, float32 moments: each step is the float32 Adam step from the
    (upcast) bfloat16 weights, rounded to bfloat16 once; the state stays float32 through a
    state-dict round trip."""
    w0 = torch.randn(20, 4).to(torch.bfloat16)
    p16 = torch.nn.Parameter(w0.clone())
    opt = Float32StateAdam([p16], **HP)
    shadow = torch.nn.Parameter(w0.float())
    ref = torch.optim.Adam([shadow], foreach=False, **HP)
    for _ in range(4):
        g = torch.randn(20, 4).to(torch.bfloat16)
        p16.grad, shadow.grad = g, g.float()
        opt.step()
        ref.step()
        with torch.no_grad():
            assert torch.equal(p16, shadow.to(torch.bfloat16))
            shadow.copy_(p16.float())  # the next step starts from the rounded weights, as ours does
    assert opt.state[p16]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p16]["exp_avg_sq"], ref.state[shadow]["exp_avg_sq"])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = Float32StateAdam([torch.nn.Parameter(p16.detach().clone())], **HP)
    again.load_state_dict(torch.load(buf))
    state = next(iter(again.state.values()))
    assert state["exp_avg"].dtype == torch.float32 and state["step"] == 4


def test_build_optimizers_keeps_bfloat16_tables_in_float32_state():
    from engram.train.engine import cast_tables

    model = EngramLM(presets.tiny(vocab_size=300))
    cast_tables(model, "bf16")
    assert type(build_optimizers(model, lr=1e-3)[1]) is Float32StateAdam


def test_parameters_without_gradient_are_skipped():
    a, b = torch.nn.Parameter(torch.randn(4, 2)), torch.nn.Parameter(torch.randn(4, 2))
    opt = SparseRowAdam([a, b], **HP)
    b_before = b.detach().clone()
    set_grad(a, torch.tensor([0, 2]), torch.ones(2, 2))
    opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0 and len(opt.state[a]) == 3


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="moments must be"):
        SparseRowAdam([torch.nn.Parameter(torch.randn(3, 2))], moments="diag")
    with pytest.raises(ValueError, match=r"tables \[rows, dim\]"):
        SparseRowAdam([torch.nn.Parameter(torch.randn(3))])


def test_build_optimizers_groups_and_learning_rates():
    model = EngramLM(presets.tiny())
    backbone, tables = build_optimizers(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert isinstance(backbone, torch.optim.AdamW) and type(tables) is torch.optim.Adam
    assert [g["name"] for g in backbone.param_groups] == ["backbone_decay", "backbone_no_decay"]
    assert [(g["lr"], g["weight_decay"]) for g in backbone.param_groups] == [(1e-3, 0.1), (1e-3, 0.0)]
    (tg,) = tables.param_groups
    assert tg["name"] == "engram_tables" and tg["lr"] == pytest.approx(5e-3) and tg["weight_decay"] == 0.0
    assert tg["betas"] == (0.9, 0.95)
    assert {id(p) for p in tg["params"]} == {id(b.engram.table.weight) for b in model.blocks if b.engram is not None}
    (row,) = build_optimizers(model, lr=1e-3, table_optimizer="row_adam")[1:]
    assert isinstance(row, SparseRowAdam) and row.param_groups[0]["moments"] == "row"
    assert len(build_optimizers(EngramLM(presets.tiny(engram=False)), lr=1e-3)) == 1
    with pytest.raises(ValueError, match="table_optimizer must be one of"):
        build_optimizers(model, lr=1e-3, table_optimizer="sgd")


@pytest.mark.parametrize("table_init_std", [1.0, 0.0])
def test_a_training_step_with_sparse_adam_moves_only_the_rows_read(rng, table_init_std):
    """With zero-initialized rows (table_init_std=0) the rows no step has read stay exactly zero."""
    c = presets.tiny()
    model = EngramLM(dataclasses.replace(c, engram=dataclasses.replace(c.engram, table_init_std=table_init_std)))
    model.use_sparse_table_grads()
    optimizers = build_optimizers(model, lr=1e-3, table_optimizer="sparse_adam")
    table = model.blocks[1].engram.table
    before = table.weight.detach().clone()
    ids = torch.randint(0, c.vocab_size, (2, 17))
    out = model(ids[:, :-1], return_intermediates=True)
    F.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert table.weight.grad.is_sparse
    assert clip_grad_norm(model.parameters(), 1.0) > 0
    for opt in optimizers:
        opt.step()
    read = torch.zeros(table.num_rows, dtype=torch.bool)
    read[(out.intermediates["rows"][1] + table.offsets).flatten()] = True
    changed = (table.weight != before).any(1)
    assert torch.equal(changed, read), (int(changed.sum()), int(read.sum()))
    if table_init_std == 0.0:
        assert not table.weight[~read].any() and table.weight[read].any(1).all()


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_clip_grad_norm_counts_sparse_rows_once_and_scales(rng, scale):
    emb, lin, unused = (torch.nn.Parameter(torch.randn(9, 3)), torch.nn.Parameter(torch.randn(4, 5)),
                        torch.nn.Parameter(torch.randn(2)))
    set_grad(emb, torch.tensor([1, 1, 1, 4, 7, 4]), torch.randn(6, 3))  # uncoalesced, repeated rows
    lin.grad = torch.randn(4, 5)
    dense_before = [emb.grad.to_dense(), lin.grad.clone()]
    expected = torch.cat([g.flatten() for g in dense_before]).norm().item()
    norm = clip_grad_norm([emb, lin, unused], max_norm=scale * expected)
    assert norm == pytest.approx(expected, rel=1e-6)
    coef = min(1.0, scale * expected / (expected + 1e-6))
    for before, after in zip(dense_before, [emb.grad.to_dense(), lin.grad]):
        assert torch.allclose(after, before * coef, rtol=1e-6, atol=0)
    after_norm = torch.cat([emb.grad.to_dense().flatten(), lin.grad.flatten()]).norm().item()
    assert after_norm == pytest.approx(min(expected, scale * expected), rel=1e-5)
    assert emb.grad.is_sparse and unused.grad is None
