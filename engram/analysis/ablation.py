"""Engram zeroed at inference: how much of each metric the backbone keeps without its memory.

    with engram_disabled(model):          # forward hooks zero each Engram output; removed on exit
        ...
    ablation_eval(model, data, seq_len=256, max_windows=50)
    # {"val_loss": {"full": 3.1, "ablated": 3.9, "kept_fraction": 0.62, ...}, "accuracy": {...}, ...}

The paper (docs/paper.md, Analysis) zeroes Engram's output and keeps 29-44% of factual-knowledge
scores but 81-93% of reading comprehension. The model is never edited: only hooks are added,
and always removed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch


def _zero_output(module: torch.nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: zeros in place of the Engram output (with `return_gates=True` the output is
    (out, gates): the first element is zeroed, the gates are kept so they can still be read)."""
    if isinstance(output, tuple):
        return (torch.zeros_like(output[0]), *output[1:])
    return torch.zeros_like(output)


@contextmanager
def engram_disabled(model: Any, layers: Iterable[int] | None = None) -> Iterator[Any]:
    """Inside the block, the chosen Engram layers (default: all) add zeros to the residual stream.

    Forward hooks on `model.blocks[i].engram`; they are removed on exit, also on an exception."""
    engram_layers = list(model.engram_layers)
    chosen = engram_layers if layers is None else [int(x) for x in layers]
    unknown = sorted(set(chosen) - set(engram_layers))
    if unknown:
        raise ValueError(f"blocks {unknown} have no Engram module; Engram layers are {engram_layers}")
    handles = []
    try:
        for layer in chosen:
            handles.append(model.blocks[layer].engram.register_forward_hook(_zero_output))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def ablation_report(model: Any, metrics: dict[str, Callable[[Any], float]], *,
                    lower_is_better: Iterable[str] = (), reference: dict[str, float] | None = None,
                    layers: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """Each metric with the model as is ("full") and with Engram disabled ("ablated").

    Higher-is-better metrics (accuracies, scores): kept_fraction = ablated / full.

    Lower-is-better metrics (losses, named in `lower_is_better`): a ratio of losses says little
    (a loss never reaches 0), so the kept fraction is the share of the model's improvement over a
    predictor that knows nothing that survives the ablation:
        kept_fraction = (reference - ablated) / (reference - full)
    where `reference[name]` is that predictor's value; by default ln(vocab_size), the
    cross-entropy in nats of a uniform prediction over the vocabulary (pass the right value for
    any other loss, e.g. bits per byte). 1 = nothing lost, 0 = no better than uniform. Losses
    also report relative_increase = (ablated - full) / full.
    """
    lower = set(lower_is_better)
    unknown = sorted(lower - set(metrics))
    if unknown:
        raise ValueError(f"lower_is_better names {unknown}, which are not among the metrics {sorted(metrics)}")
    reference = dict(reference or {})
    full = {name: float(fn(model)) for name, fn in metrics.items()}
    with engram_disabled(model, layers):
        ablated = {name: float(fn(model)) for name, fn in metrics.items()}
    report: dict[str, dict[str, Any]] = {}
    for name in metrics:
        x, y = full[name], ablated[name]
        if name in lower:
            ref = reference.get(name, math.log(model.config.vocab_size))
            report[name] = {"full": x, "ablated": y, "lower_is_better": True, "reference": ref,
                            "kept_fraction": _ratio(ref - y, ref - x), "relative_increase": _ratio(y - x, x)}
        else:
            report[name] = {"full": x, "ablated": y, "lower_is_better": False, "kept_fraction": _ratio(y, x)}
    return report


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


@torch.no_grad()
def next_token_accuracy(model: Any, data: Any, seq_len: int, max_windows: int) -> float:
    """Top-1 next-token accuracy on the validation windows `engram.train.loop.evaluate` reads."""
    was_training = model.training
    model.eval()
    correct, n = 0, 0
    try:
        for window in data.val.windows(seq_len, max_windows=max_windows):
            logits = model(window[:, :-1]).logits
            correct += int((logits.argmax(-1) == window[:, 1:].to(logits.device)).sum())
            n += window.shape[1] - 1
    finally:
        model.train(was_training)
    return correct / n


def ablation_eval(model: Any, data: Any, seq_len: int, max_windows: int,
                  layers: Iterable[int] | None = None) -> dict[str, dict[str, Any]]:
    """val_loss, val_bpb (lower is better; references: a uniform prediction over the vocabulary)
    and next-token top-1 accuracy, with and without Engram, on the same validation windows."""
    from ..eval import evaluate

    V = model.config.vocab_size
    last: dict[str, float] = {}  # one evaluate() gives both numbers: val_bpb reads what val_loss left

    def val_loss(m: Any) -> float:
        last.update(evaluate(m, data, seq_len, max_windows))
        return last["val_loss"]

    def val_bpb(m: Any) -> float:
        return last.pop("val_bpb") if "val_bpb" in last else evaluate(m, data, seq_len, max_windows)["val_bpb"]

    metrics = {
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "accuracy": lambda m: next_token_accuracy(m, data, seq_len, max_windows),
    }
    reference = {"val_loss": math.log(V), "val_bpb": math.log2(V) / data.bytes_per_token("val")}
    return ablation_report(model, metrics, lower_is_better={"val_loss", "val_bpb"}, reference=reference,
                           layers=layers)
