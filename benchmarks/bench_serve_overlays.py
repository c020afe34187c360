"""What per-request memory overlays cost a vLLM engine, at equal batch.

One engine serves bench_serve's Engram model (width 256, 8 blocks, tables ~10x the backbone)
with K named overlays loaded (each a user's memory: R random rows per Engram layer). One
batch of N requests (prompts uniform in [100, L], O new tokens each, all sent at once) is
generated in three ways, taking turns over several rounds:
- `none`: no request selects an overlay (the overlays are loaded, unused);
- `each`: request i selects overlay i mod K (K users in one batch);
- `stack3`: request i selects three overlays stacked.
Reported: output tokens/s per arm (median over rounds) and its ratio to `none`. Also, once:
the same batch on an engine with no overlays loaded, and the gather alone (MixedOverlayTable
vs its base table, T tokens x heads, one overlay chosen per token) timed in this process.
Runs in the vLLM venv (docs/serving.md); prints a table, writes JSON and a PNG under --out,
and the last line is one JSON object.

    python benchmarks/bench_serve_overlays.py [--overlays 16] [--rows 512] [--requests 32]
        [--max-prompt 256] [--output 32] [--rounds 5] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench_engine import engram_config, interleaved
from common import machine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def write_model_and_overlays(root: Path, n_overlays: int, rows: int):
    """The exported Engram model and `n_overlays` overlays of `rows` random rows per layer."""
    from engram import EngramLM
    from engram.hf import EngramForCausalLM
    from engram.memory.overlay import Overlay, read_rows, rows_sha256

    _, cfg = engram_config()
    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(cfg, engram=dataclasses.replace(cfg.engram, table_init_std=1.0))).eval()
    EngramForCausalLM.from_engram(model).save_pretrained(root / "engram")
    gen, folders = torch.Generator().manual_seed(1), {}
    for k in range(n_overlays):
        changed, before = {}, {}
        for layer in model.engram_layers:
            table = model.blocks[layer].engram.table
            r = torch.randperm(table.num_rows, generator=gen)[:rows].sort().values
            changed[layer] = (r, torch.randn(rows, table.embedding_dim, generator=gen))
            before[layer] = rows_sha256(read_rows(table, r))
        folders[f"user{k}"] = str(Overlay(model.layout.to_dict(), {"checkpoint": "bench"}, changed, before)
                                  .save(root / f"user{k}"))
    return root / "engram", folders, model


def gather_cost(model, folders: dict, tokens: int, repeats: int) -> dict:
    """Seconds per gather of `tokens` tokens x heads: the base table, and under the overlays
    with each token choosing one (the work the engine adds per Engram layer)."""
    from engram.memory.overlay import Overlay
    from engram.memory.overlay_mix import MixedOverlayTable

    layer = model.engram_layers[0]
    base = model.blocks[layer].engram.table
    mixed = MixedOverlayTable(base, [Overlay.load(f).rows[layer] for f in folders.values()])
    gen = torch.Generator().manual_seed(2)
    rows = torch.stack([torch.randint(0, s, (1, tokens), generator=gen) for s in base.table_sizes], dim=-1)
    mixed.choose(torch.randint(0, len(folders), (tokens, 1), generator=gen))
    with torch.no_grad():
        times = interleaved({"base": lambda: base(rows), "mixed": lambda: mixed(rows)}, repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def run_engine(folder: Path, overlays: dict | None, prompts, arms: dict, args) -> dict[str, list[float]]:
    """Output tokens/s of each arm (a list of per-request overlay choices), arms taking turns."""
    import vllm

    llm = vllm.LLM(str(folder), dtype="float32", seed=0, enforce_eager=True, skip_tokenizer_init=True,
                   max_model_len=args.max_prompt + args.output, max_num_seqs=len(prompts),
                   enable_prefix_caching=False,  # every round repeats the prompts: no cache hits, only work
                   hf_overrides={"engram_overlays": overlays} if overlays else None)
    try:
        def run(choices, batch=prompts):
            params = [vllm.SamplingParams(temperature=0, max_tokens=args.output, ignore_eos=True,
                                          extra_args=None if c is None else {"engram_overlays": c}) for c in choices]
            start = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            wall = time.perf_counter() - start
            return sum(len(o.outputs[0].token_ids) for o in outs) / wall

        for choices in arms.values():  # warm-up
            run(choices[:4], prompts[:4])
        out = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, choices in arms.items():
                out[name].append(run(choices))
        return out
    finally:
        llm.llm_engine.engine_core.shutdown()
        gc.collect()


def plot(medians: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(medians)
    ax.bar(names, [medians[n] for n in names], color=["#888", "#4c72b0", "#55a868", "#c44e52"][:len(names)])
    ax.set_ylabel("output tokens/s (median)")
    ax.set_title("vLLM, one batch: per-request overlays vs none")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overlays", type=int, default=16, help="named overlays loaded (users)")
    ap.add_argument("--rows", type=int, default=512, help="changed rows per overlay and Engram layer")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, overlays, model = write_model_and_overlays(Path(tmp), args.overlays, args.rows)
        vocab = model.config.vocab_size
        lengths = rng.integers(100, args.max_prompt + 1, args.requests)
        prompts = [rng.integers(0, vocab, int(n)).tolist() for n in lengths]
        gather = gather_cost(model, overlays, tokens=args.requests * 8, repeats=30)
        names = list(overlays)
        arms = {"none": [None] * len(prompts),
                "each": [names[i % len(names)] for i in range(len(prompts))],
                "stack3": [[names[(i + j) % len(names)] for j in range(3)] for i in range(len(prompts))]}
        rates = run_engine(folder, overlays, prompts, arms, args)
        unloaded = run_engine(folder, None, prompts, {"not_loaded": arms["none"]}, args)["not_loaded"]
    medians = {"not_loaded": statistics.median(unloaded), **{n: statistics.median(r) for n, r in rates.items()}}
    ratios = {n: statistics.median([a / b for a, b in zip(rates[n], rates["none"])]) for n in rates}

    print(f"# bench_serve_overlays  {machine()}")
    print(f"# {args.overlays} overlays x {args.rows} rows/layer; {args.requests} requests, "
          f"prompts 100..{args.max_prompt}, "
          f"{args.output} new tokens; {args.rounds} interleaved rounds")
    print(f"{'arm':>12} {'tok/s (median)':>15} {'/ none (median of rounds)':>26}")
    for name, value in medians.items():
        ratio = f"{ratios[name]:.3f}" if name in ratios else "(own engine)"
        print(f"{name:>12} {value:15.1f} {ratio:>26}")
    print(f"gather of {args.requests * 8} tokens: base {gather['base'] * 1e6:.0f} us, with overlays "
          f"{gather['mixed'] * 1e6:.0f} us ({gather['mixed'] / gather['base']:.2f}x)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today()}_bench_serve_overlays_cpu"
    result = {"benchmark": "bench_serve_overlays", "machine": machine(), "args": vars(args),
              "tokens_per_s": {n: r for n, r in rates.items()} | {"not_loaded": unloaded},
              "median_tokens_per_s": medians, "ratio_to_none": ratios,
              "gather_s": gather, "gather_ratio": gather["mixed"] / gather["base"]}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(medians, out / f"{stem}.png")
    print(json.dumps({"benchmark": "bench_serve_overlays", "ratio_each_to_none": round(ratios["each"], 4),
                      "ratio_stack3_to_none": round(ratios["stack3"], 4),
                      "gather_ratio": round(result["gather_ratio"], 3), "median_tokens_per_s": medians}))


if __name__ == "__main__":
    sys.exit(main())
