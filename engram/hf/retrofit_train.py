"""`engram retrofit`: train an Engram adapter for a pretrained transformers model on a corpus.

The corpus is a dataset folder from `engram data build` (its documents, re-tokenized with the
model's own tokenizer); the model an HF folder or a GGUF file. The run folder holds, like a
training run's: run.json, metrics.jsonl (and TensorBoard), loss_curve.png, summary.json and
checkpoints/step_N/ (the adapter, the optimizer state, trainer.json, sha256 checksums; written
atomically), and `--resume` continues from the newest good checkpoint. Step 0's evaluation is
the base model's own loss: the adapter starts with a zero value projection (bit-identical).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..durable import atomic_write_text
from ..eval import held_out_loss
from ..runs import Checkpoints, check_output, check_same_run, list_checkpoints, write_run
from ..train.metrics import MetricsLogger, plot_losses
from ..train.trainer import Trainer, cosine_schedule
from .retrofit import (ADAPTER_WEIGHTS, add_engram, engram_param_groups, load_engram_adapter,
                       save_engram_adapter)


@dataclass(frozen=True, kw_only=True)
class RetrofitConfig:
    layers: tuple[int, ...] = (1, 14)  # 0-based decoder layers (the paper: layers 2 and 15 of 30)
    rows_per_head: int | None = None  # default 5x the compressed vocabulary
    n_head_per_ngram: int = 8
    n_embed_per_ngram: int = 256
    steps: int = 40
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 1e-3  # projections and norms; the tables at 5x (the paper's recipe)
    warmup_steps: int = 5
    eval_every: int = 20
    eval_windows: int = 16
    checkpoint_every: int = 20
    keep_last: int = 2
    seed: int = 0
    prompt: str = "The capital of France is"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "checkpoint_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not self.layers:
            raise ValueError(f"need lr > 0 and at least one layer, got lr={self.lr}, layers={self.layers}")


def load_base(path: str | Path):
    """(model, tokenizer) of an HF folder or a GGUF file (dequantized to float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf":
        kw = {"gguf_file": path.name}
        folder = path.parent
    else:
        kw, folder = {}, path
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    return model.eval(), tok


def _tokens(data_dir: Path, split: str, tok, cache: Path) -> np.ndarray:
    """The split's documents in the model's tokenization, each followed by EOS (cached)."""
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    eos = tok.eos_token_id
    ids: list[int] = []
    with open(data_dir / f"{split}.jsonl") as f:
        for line in f:
            ids += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(eos)
    arr = np.asarray(ids, dtype=np.int64)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, arr, allow_pickle=False)
    tmp.replace(cache)
    return arr


def _batch(tokens: np.ndarray, step: int, cfg: RetrofitConfig) -> torch.Tensor:
    """Windows [B, T + 1] at offsets drawn from (seed, step): resumable to the same batches."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, cfg.batch_size)
    return torch.from_numpy(np.stack([tokens[s:s + cfg.seq_len + 1] for s in starts]))


def _eval(model, tokens: np.ndarray, cfg: RetrofitConfig) -> float:
    """Held-out loss over consecutive windows of the validation tokens (the one eval loop)."""
    n = min(cfg.eval_windows, (len(tokens) - 1) // cfg.seq_len)
    windows = [torch.from_numpy(tokens[i * cfg.seq_len: (i + 1) * cfg.seq_len + 1])[None] for i in range(n)]
    model.eval()
    return held_out_loss(lambda ids: model(ids, use_cache=False).logits, windows)[0]


def retrofit(out_dir: str | Path, base: str | Path, data_dir: str | Path, cfg: RetrofitConfig, *,
             resume: bool = False, progress: bool = True, log=print) -> dict[str, Any]:
    """Train an Engram adapter on `base` (adapter mode: the base stays frozen). Returns the summary."""
    out, data_dir = Path(out_dir), Path(data_dir)
    inside = data_dir.resolve().parent == out.resolve()  # the default: the corpus built in OUT/data
    check_output(out, sources=[base] if inside else [base, data_dir], what="run", resume=resume,
                 may_hold=[data_dir.name] if inside else ())
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(dataclasses.asdict(cfg)))
    same = {"base": str(Path(base).resolve()), "data_dir": str(data_dir.resolve())}
    checkpoints = Checkpoints(out, keep_last=cfg.keep_last, weights=save_engram_adapter)
    ckpt = checkpoints.latest_good(warn=log) if resume else None
    if ckpt is not None:
        check_same_run(out, settings_key="retrofit", settings=settings, defaults={}, same=same)
    t0 = time.perf_counter()
    model, tok = load_base(base)
    log(f"loaded {base}: {sum(p.numel() for p in model.parameters()):,} parameters in {time.perf_counter() - t0:.0f} s")
    train_tokens = _tokens(data_dir, "train", tok, out / "train_tokens.npy")
    val_tokens = _tokens(data_dir, "val", tok, out / "val_tokens.npy")
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        load_engram_adapter(model, ckpt)
    else:
        add_engram(model, layers=cfg.layers, tokenizer=tok, rows_per_head=cfg.rows_per_head,
                   n_head_per_ngram=cfg.n_head_per_ngram, n_embed_per_ngram=cfg.n_embed_per_ngram, seed=cfg.seed)
        write_run(out, {"retrofit": settings, **same})
    opt = torch.optim.AdamW(engram_param_groups(model, cfg.lr), betas=(0.9, 0.95))
    start = checkpoints.restore(ckpt, model, [opt])["step"] if ckpt is not None else 0
    metrics = MetricsLogger(out, resume_step=start if ckpt is not None else None)
    if start == 0:
        base_loss = _eval(model, val_tokens, cfg)  # the zero value projection: exactly the base model
        metrics.log({"kind": "eval", "step": 0, "val_loss": base_loss})
        log(f"base model: held-out loss {base_loss:.4f}")
    Trainer(model=model, optimizers=[opt], max_steps=cfg.steps, batches=lambda step: _batch(train_tokens, step, cfg),
            schedule=lambda step: cosine_schedule(step, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps,
                                                  min_lr_ratio=0.1),
            logits_fn=lambda ids: model(ids, use_cache=False).logits,
            evaluate=lambda: {"val_loss": _eval(model, val_tokens, cfg)}, eval_every=cfg.eval_every,
            checkpoints=checkpoints, checkpoint_every=cfg.checkpoint_every, checkpoint_state={"seed": cfg.seed},
            metrics=metrics, progress="retrofit" if progress else None, log=log).fit(start)
    model.eval()
    return _summarize(out, base, model, tok, cfg, metrics.read())


def _summarize(out: Path, base, model, tok, cfg: RetrofitConfig, records: list[dict]) -> dict[str, Any]:
    """summary.json and loss_curve.png of a finished retrofit, with a cached and an uncached sample."""
    plot_losses(records, out / "loss_curve.png", title=f"Engram retrofit of {Path(base).name}")
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["s_per_step"] for r in records if r["kind"] == "train"]
    prompt = torch.tensor([tok(cfg.prompt)["input_ids"]])
    gen = dict(max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **gen)
        uncached = model.generate(prompt, use_cache=False, **gen)
    summary = {"base_val_loss": evals[0]["val_loss"], "final_val_loss": evals[-1]["val_loss"], "steps": cfg.steps,
               "s_per_step_median": statistics.median(steps) if steps else None,
               "adapter_bytes": (list_checkpoints(out)[-1] / ADAPTER_WEIGHTS).stat().st_size,
               "adapter_params": sum(p.numel() for p in model.engram_adapter.parameters()),
               "sample": tok.decode(cached[0], skip_special_tokens=True),
               "cached_equals_uncached": bool(torch.equal(cached, uncached)), "run_dir": str(out)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
