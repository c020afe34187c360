"""torch.compile(model, fullgraph=True): no graph breaks, and the same numbers as eager.

CI checks the capture (dynamo's `explain`, which fails on any host sync or data-dependent
branch) and the traced forward + backward run by AOT autograd without a C++ compiler
(backend "aot_eager"). The inductor runs take minutes on two cores: marked slow.
"""

import dataclasses

import pytest
import torch

from engram import EngramLM, presets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_model(M=1, seed=0):
    """`tiny` cut to what compiles fast: a dense block and an MoE + Engram block."""
    torch.manual_seed(seed)
    config = presets.tiny(n_layers=2, max_seq_len=32, n_streams=M)
    model = EngramLM(dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=1.0)))
    with torch.no_grad():  # non-trivial conv and hyper-connection maps
        model.blocks[1].engram.short_conv.weight.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if name.endswith(".phi"):
                p.normal_(0, 0.3)
    return model


def breaks(fn, *args, **kwargs):
    torch._dynamo.reset()
    e = torch._dynamo.explain(fn)(*args, **kwargs)
    return e.graph_break_count, [str(r.reason)[:200] for r in e.break_reasons]


def prompts(B=2, S=9):
    """A left-padded batch: row 1 has 3 pads."""
    ids = torch.randint(1, 8192, (B, S))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :3] = False
    return ids.masked_fill(~valid, 0), valid


@pytest.mark.parametrize("M", [1, 2])
def test_train_forward_and_decode_step_have_no_graph_breaks(M):
    model = tiny_model(M)
    ids, valid = prompts()
    n, why = breaks(model, ids)
    assert n == 0, f"training forward: {n} graph breaks: {why}"
    model.eval()
    state = model.new_state(2, max_len=16)
    with torch.no_grad():
        n, why = breaks(model, ids, state, valid=valid)  # a left-padded prefill
        assert n == 0, f"prefill: {n} graph breaks: {why}"
        n, why = breaks(model, ids[:, :1], state)  # one decode step
        assert n == 0, f"decode step: {n} graph breaks: {why}"
        n, why = breaks(model, ids, use_cache=True)  # a prefill that makes its own state
        assert n == 0, f"prefill with use_cache: {n} graph breaks: {why}"


def test_traced_forward_backward_and_decode_equal_eager():
    """The whole graphs dynamo captures, run through AOT autograd (forward and backward
    traced, then executed by eager kernels): the same numbers as eager, to float32 rounding."""
    model = tiny_model(M=2)
    ids, valid = prompts()
    torch._dynamo.reset()
    traced = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = traced(ids).logits
    got.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = model(ids).logits
    want.square().mean().backward()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)

    model.eval()
    with torch.no_grad():
        eager_state, traced_state = model.new_state(2, max_len=12), model.new_state(2, max_len=12)
        want = [model(ids, eager_state, valid=valid).logits]
        got = [traced(ids, traced_state, valid=valid).logits]
        for t in range(3):
            token = torch.randint(0, 8192, (2, 1))
            want.append(model(token, eager_state).logits)
            got.append(traced(token, traced_state).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-6, rtol=1e-6)
    for a, b in zip(traced_state.tensors(), eager_state.tensors()):  # the traced graph reads all C columns
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert traced_state.written is None and eager_state.written == 12


def test_sparse_table_gradients_survive_compile():
    """Sparse table gradients (sparse_adam / row_adam) cannot live in a compiled graph: the
    gather runs eagerly between graphs, and every gradient equals eager, the table's sparse."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    config = presets.tiny(n_layers=2, max_seq_len=64)
    model = EngramLM(config).use_sparse_table_grads()
    ids = torch.randint(0, config.vocab_size, (2, 33))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fn(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    eager = grads(model)
    traced = grads(torch.compile(model, backend="aot_eager"))
    assert traced.keys() == eager.keys() and traced["blocks.1.engram.table.weight"].is_sparse
    for name, g in eager.items():
        diff = (g.to_dense() - traced[name].to_dense()).abs().max().item()
        assert diff < 1e-6, (name, diff)
    with torch.no_grad():  # decoding needs no sparse gradient: one graph again
        assert breaks(model, ids)[0] == 0


@pytest.mark.slow
def test_inductor_compiled_train_step_and_decode_equal_eager():
    """Inductor on CPU (a few minutes on two cores): forward + backward and a decode loop."""
    model = tiny_model(M=1)
    ids, valid = prompts()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(ids).logits
    got.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = model(ids).logits
    want.square().mean().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-3, msg=n)
    model.eval()
    with torch.no_grad():
        eager_state, compiled_state = model.new_state(2, max_len=16), model.new_state(2, max_len=16)
        want = [model(ids, eager_state, valid=valid).logits]
        got = [compiled(ids, compiled_state, valid=valid).logits]
        for t in range(4):
            token = torch.randint(0, 8192, (2, 1))
            want.append(model(token, eager_state).logits)
            got.append(compiled(token, compiled_state).logits)
    torch.testing.assert_close(torch.cat(got, 1), torch.cat(want, 1), atol=1e-5, rtol=1e-4)
