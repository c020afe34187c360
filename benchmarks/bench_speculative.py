"""Prompt-lookup speculative decoding against plain greedy decoding, on a run's own corpus.

Prompts are --prompts validation windows of --prompt-len tokens of the run's dataset; each is
continued by --new-tokens tokens at batch 1, plain greedy (`generate`) and speculative
(`speculative_generate`, drafts of --draft tokens looked up in the context). Interleaved passes,
medians of --repeats; reports tokens/s of each, the speed-up, the acceptance rate (accepted /
drafted), tokens per forward, and how many outputs differ from plain greedy (should be 0).
Prints a table, then one JSON line.

    python benchmarks/bench_speculative.py --run docs/results/runs/knowledge_d128_engram_500steps_seed0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import machine
from engram.model.generate import generate, speculative_generate
from engram.runs import latest_good_checkpoint, load_checkpoint
from engram.data.dataset import PreparedData


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--draft", type=int, default=8, help="draft tokens per verification forward")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ckpt = latest_good_checkpoint(args.run)
    model = load_checkpoint(ckpt)[0].eval()
    meta = json.loads((ckpt.parent.parent / "run.json").read_text())
    data = PreparedData.open(meta["data_dir"])
    windows = list(data.val.windows(args.prompt_len, max_windows=args.prompts))
    prompts = [w[0, :args.prompt_len].tolist() for w in windows]
    times = {"plain": [], "speculative": []}
    plain = spec = stats = None
    with torch.no_grad():
        generate(model, prompts[:1], 4, temperature=0)  # warm up
        for _ in range(args.repeats):
            start = time.perf_counter()
            plain = [generate(model, [p], args.new_tokens, temperature=0)[0] for p in prompts]
            times["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            spec, stats = speculative_generate(model, prompts, args.new_tokens, draft_tokens=args.draft)
            times["speculative"].append(time.perf_counter() - start)
    tokens = sum(len(p) for p in plain)
    plain_tps = tokens / statistics.median(times["plain"])
    spec_tps = stats["new_tokens"] / statistics.median(times["speculative"])
    differ = sum(a != b for a, b in zip(plain, spec))
    result = {"benchmark": "bench_speculative", "machine": machine(), "run": args.run, "prompts": len(prompts),
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "draft": args.draft,
              "plain_tokens_per_s": plain_tps, "speculative_tokens_per_s": spec_tps, "speedup": spec_tps / plain_tps,
              "acceptance_rate": stats["accepted"] / max(stats["drafted"], 1),
              "tokens_per_forward": stats["new_tokens"] / stats["forwards"], "outputs_differing": differ, **stats}
    print(machine())
    print(f"{args.run}: {len(prompts)} prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each, "
          f"batch 1, drafts of {args.draft}; median of {args.repeats} interleaved passes")
    print(f"{'decoding':12s} {'tokens/s':>9s}")
    print(f"{'plain':12s} {plain_tps:9.1f}")
    print(f"{'speculative':12s} {spec_tps:9.1f}   x{spec_tps / plain_tps:.2f}")
    print(f"acceptance {result['acceptance_rate']:.1%} of {stats['drafted']} drafted tokens; "
          f"{result['tokens_per_forward']:.2f} tokens per forward; outputs differing from greedy: {differ}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
