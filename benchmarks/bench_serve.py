"""The paper's serving experiment (Table 4) scaled to this machine: Engram models under
continuous batching in vLLM, with the tables on the device, in host memory, on disk behind a
prefetch, and in int8, against the same backbone without Engram and against vLLM's own Llama of
that backbone's shape. Static-batch `engram.generate` and transformers' continuous batching
(on that Llama) are the references outside vLLM.

Workload (Table 4: 512 sequences, prompt lengths uniform in [100, 1024]): N requests, prompt
lengths uniform in [100, L], random token ids, exactly O new tokens each (ignore_eos), sent
- all at once under a client-side concurrency limit C (each C in --concurrency), and
- at a Poisson rate (--rate requests/s, no limit).
Reported per arm: output tokens/s, time to first token (TTFT) and inter-token latency (ITL),
p50 and p99, measured at the client from the engine's streamed outputs.

Model: the shape of bench_engine.py (width 256, 8 blocks, GQA 8/4, SwiGLU 768, vocab 8192,
M = 1, Engram at blocks 1 and 4 with tables ~10x the backbone); the model without Engram and
the Llama share the Engram model's backbone tensors. Every engine runs eagerly
(enforce_eager: our model has no torch.compile integration in vLLM yet, so the Llama is run
the same way). Each round starts every arm's engine once, in a rotated order; ratios are
medians over rounds. Runs in the vLLM venv (docs/serving.md); prints a table, writes JSON and
a PNG, and the last line is one JSON object.

    python benchmarks/bench_serve.py [--requests 48] [--max-prompt 384] [--output 32]
        [--concurrency 4 16 48] [--rate 4] [--rounds 2] [--arms ...] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench_engine import engram_config, shared_backbone
from common import machine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

VLLM_ARMS = ["vllm_llama", "vllm_no_engram", "vllm_engram", "vllm_engram_host", "vllm_engram_disk",
             "vllm_engram_int8"]
ARMS = VLLM_ARMS + ["engram_static", "hf_continuous"]


# ---------------------------------------------------------------------------- the models
def write_models(root: Path) -> dict[str, Path]:
    """The Engram model, the same backbone without Engram, that backbone as a transformers
    Llama, and the Engram tables offloaded (fp32 and int8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram import EngramLM
    from engram.cli.main import main as engram_main
    from engram.hf import EngramForCausalLM

    dense_cfg, engram_cfg = engram_config()
    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(engram_cfg, engram=dataclasses.replace(engram_cfg.engram,
                                                                               table_init_std=1.0))).eval()
    dense = shared_backbone(dense_cfg, model).eval()
    paths = {"engram": root / "engram", "no_engram": root / "no_engram", "llama": root / "llama"}
    EngramForCausalLM.from_engram(model).save_pretrained(paths["engram"])
    EngramForCausalLM.from_engram(dense).save_pretrained(paths["no_engram"])
    c = dense_cfg
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.mlp_hidden_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        head_dim=c.attn_head_dim, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings))
    ours = dense.state_dict()
    names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(c.n_layers):
        for theirs, mine in (("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"),
                             ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"),
                             ("mlp.gate_proj", "mlp.w_gate"), ("mlp.up_proj", "mlp.w_up"),
                             ("mlp.down_proj", "mlp.w_down"), ("input_layernorm", "attn_norm"),
                             ("post_attention_layernorm", "mlp_norm")):
            names[f"model.layers.{i}.{theirs}.weight"] = f"blocks.{i}.{mine}.weight"
    llama.load_state_dict({theirs: ours[mine] for theirs, mine in names.items()})
    llama.save_pretrained(paths["llama"])
    for kind in ("fp32", "int8"):
        paths[f"tables_{kind}"] = root / f"tables_{kind}"
        engram_main(["offload", str(paths["engram"]), "--out", str(paths[f"tables_{kind}"]), "--dtype", kind])
    return paths


def workload(n: int, max_prompt: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(length)).tolist() for length in rng.integers(100, max_prompt + 1, n)]


# ---------------------------------------------------------------------------- measuring
def summarize(records: list[dict], wall: float) -> dict:
    ttft = [r["first"] - r["sent"] for r in records]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(len(r["times"]) for r in records)
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1000 if xs else float("nan")  # noqa: E731
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "output_tokens": tokens}


async def drive(engine, prompts: list[list[int]], out_tokens: int, *, concurrency: int | None = None,
                rate: float | None = None, seed: int = 0) -> tuple[list[dict], float, list[list[int]]]:
    """Send every prompt (limited to `concurrency` in flight, or arriving at a Poisson `rate`)
    and time each streamed token at the client."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=out_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    gate = asyncio.Semaphore(concurrency or len(prompts))
    gaps = np.random.default_rng(seed).exponential(1 / rate, len(prompts)) if rate else np.zeros(len(prompts))
    t0 = time.perf_counter()
    arrivals = t0 + np.cumsum(gaps)

    async def one(i):
        await asyncio.sleep(max(0.0, arrivals[i] - time.perf_counter()))
        async with gate:
            rec = {"sent": time.perf_counter(), "times": [], "tokens": []}
            async for out in engine.generate({"prompt_token_ids": prompts[i]}, params, request_id=f"r{i}-{t0}"):
                now = time.perf_counter()
                new = out.outputs[0].token_ids
                rec["times"] += [now] * len(new)
                rec["tokens"] += list(new)
            rec["first"] = rec["times"][0]
            return rec

    records = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return records, time.perf_counter() - t0, [r["tokens"] for r in records]


def run_vllm_arm(folder: Path, overrides: dict, prompts, args) -> dict:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=str(folder), dtype="float32", enforce_eager=True, max_model_len=args.max_prompt + args.output,
        max_num_seqs=max(args.concurrency), skip_tokenizer_init=True, seed=0, hf_overrides=overrides,
        enable_prefix_caching=False))
    try:
        async def all_modes():
            await drive(engine, prompts[:4], 4)  # warm-up
            out = {}
            for c in args.concurrency:
                records, wall, tokens = await drive(engine, prompts, args.output, concurrency=c)
                out[f"c{c}"] = summarize(records, wall)
                out.setdefault("tokens", tokens)
            if args.rate:
                records, wall, _ = await drive(engine, prompts, args.output, rate=args.rate)
                out["poisson"] = summarize(records, wall)
            return out

        return asyncio.run(all_modes())
    finally:
        engine.shutdown()
        gc.collect()


def run_engram_static(folder: Path, prompts, args) -> dict:
    """engram.generate on groups of C prompts (left-padded static batches): each group's first
    token costs a generate of 1 token, the other O - 1 tokens the difference to a generate of
    all O; each group runs a warm-up generate first (its first call at a new size allocates)."""
    from engram import generate
    from engram.runs import open_run

    model = open_run(folder).model
    out = {}
    for c in args.concurrency:
        records, busy = [], 0.0
        for start in range(0, len(prompts), c):
            group = prompts[start:start + c]
            generate(model, group, 1, temperature=0)  # warm-up, not counted
            sent = time.perf_counter()
            generate(model, group, 1, temperature=0)
            first = time.perf_counter() - sent
            t = time.perf_counter()
            generate(model, group, args.output, temperature=0)
            full = time.perf_counter() - t
            step = max(0.0, full - first) / max(1, args.output - 1)
            records += [{"sent": busy, "first": busy + first, "times": [busy + first + k * step
                                                                        for k in range(args.output)]}
                        for _ in group]
            busy += full  # the group's own time: the clock of a server that runs only this
        out[f"c{c}"] = summarize(records, busy)
    return out


def run_hf_continuous(folder: Path, prompts, args) -> dict:
    """transformers' continuous batching (generate_batch) on the Llama, all requests at once."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=args.output, do_sample=False, eos_token_id=-1,
                              pad_token_id=0)
    model.generate_batch(prompts[:2], generation_config=config)
    t0 = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=config, record_timestamps=True)
    wall = time.perf_counter() - t0
    records = []
    for res in results.values():
        stamps = list(getattr(res, "timestamps", None) or [])
        created = getattr(res, "created_time", t0)
        times = stamps if stamps else [t0 + wall] * len(res.generated_tokens)
        records.append({"sent": created, "first": times[0], "times": times})
    return {f"c{len(prompts)}": summarize(records, wall)}


# ---------------------------------------------------------------------------- the report
def ratios(rounds: list[dict], concurrency: list[int]) -> dict:
    """Throughput ratios per round at each concurrency >= 16, then medians over rounds."""
    pairs = {"host_vs_resident": ("vllm_engram_host", "vllm_engram"),
             "disk_vs_resident": ("vllm_engram_disk", "vllm_engram"),
             "int8_vs_resident": ("vllm_engram_int8", "vllm_engram"),
             "engram_vs_no_engram": ("vllm_engram", "vllm_no_engram"),
             "no_engram_vs_vllm_llama": ("vllm_no_engram", "vllm_llama")}
    out = {}
    for name, (a, b) in pairs.items():
        for c in concurrency:
            if c < 16:
                continue
            values = [r[a][f"c{c}"]["tokens_per_s"] / r[b][f"c{c}"]["tokens_per_s"]
                      for r in rounds if a in r and b in r]
            if values:
                out[f"{name}_c{c}"] = statistics.median(values)
    return out


def plot(median: dict, concurrency: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for arm, modes in median.items():
        cs = [c for c in concurrency if f"c{c}" in modes]
        if not cs:
            continue
        style = "o-" if arm.startswith("vllm") else "s--"
        axes[0].plot(cs, [modes[f"c{c}"]["tokens_per_s"] for c in cs], style, label=arm)
        axes[1].plot(cs, [modes[f"c{c}"]["ttft_p50_ms"] for c in cs], style, label=arm)
        axes[2].plot(cs, [modes[f"c{c}"]["itl_p50_ms"] for c in cs], style, label=arm)
    for ax, title in zip(axes, ["output tokens/s", "time to first token, p50 (ms)", "inter-token latency, p50 (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Serving Engram on vLLM (CPU, medians over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-prompt", type=int, default=384, help="prompt lengths uniform in [100, this]")
    ap.add_argument("--output", type=int, default=32, help="new tokens per request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 48])
    ap.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=ARMS)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        paths = write_models(Path(tmp))
        prompts = workload(args.requests, args.max_prompt, engram_config()[0].vocab_size)
        setups = {"vllm_llama": (paths["llama"], {}), "vllm_no_engram": (paths["no_engram"], {}),
                  "vllm_engram": (paths["engram"], {}),
                  "vllm_engram_host": (paths["engram"], {"engram_table_tier": "host"}),
                  # on a CPU the page cache is the hot-row cache: a CachedTable in front of it
                  # costs 5-8x per gather here (docs/LOG.md); --cache-rows is for GPUs
                  "vllm_engram_disk": (paths["engram"], {"engram_tables": str(paths["tables_fp32"])}),
                  "vllm_engram_int8": (paths["engram"], {"engram_tables": str(paths["tables_int8"])})}
        rounds, tokens = [], {}
        for r in range(args.rounds):
            order = args.arms[r % len(args.arms):] + args.arms[:r % len(args.arms)]  # rotated
            result = {}
            for arm in order:
                print(f"round {r + 1}/{args.rounds}: {arm} ...", file=sys.stderr, flush=True)
                if arm in setups:
                    result[arm] = run_vllm_arm(*setups[arm], prompts, args)
                    tokens[arm] = result[arm].pop("tokens")
                elif arm == "engram_static":
                    result[arm] = run_engram_static(paths["engram"], prompts, args)
                else:
                    result[arm] = run_hf_continuous(paths["llama"], prompts, args)
            rounds.append(result)

    median = {arm: {mode: {k: statistics.median(r[arm][mode][k] for r in rounds) for k in rounds[0][arm][mode]}
                    for mode in rounds[0][arm]} for arm in args.arms}
    same = {}
    for a, b in (("vllm_engram_host", "vllm_engram"), ("vllm_engram_disk", "vllm_engram"),
                 ("vllm_no_engram", "vllm_llama")):
        if a in tokens and b in tokens:
            same[f"{a}=={b}"] = sum(x == y for x, y in zip(tokens[a], tokens[b]))
    print(f"\nbench_serve on {machine()}; {args.requests} requests, prompts uniform in [100, {args.max_prompt}], "
          f"{args.output} new tokens; medians of {args.rounds} rounds")
    print(f"{'arm':<20}{'mode':<9}{'tok/s':>9}{'TTFT p50':>10}{'p99':>9}{'ITL p50':>9}{'p99':>9}  (ms)")
    for arm, modes in median.items():
        for mode, m in modes.items():
            print(f"{arm:<20}{mode:<9}{m['tokens_per_s']:>9.1f}{m['ttft_p50_ms']:>10.1f}{m['ttft_p99_ms']:>9.1f}"
                  f"{m['itl_p50_ms']:>9.1f}{m['itl_p99_ms']:>9.1f}")
    rat = ratios(rounds, args.concurrency)
    for name, value in rat.items():
        print(f"{name:<36}{value:.3f}")
    for name, n in same.items():
        print(f"greedy tokens equal, {name}: {n} of {args.requests} requests")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{datetime.date.today()}_bench_serve_cpu"
    report = {"bench": "serve", "machine": machine(), "args": vars(args), "median": median, "rounds": rounds,
              "ratios": rat, "tokens_equal": same}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(median, args.concurrency, stem.with_suffix(".png"))
    print(json.dumps({"bench": "serve", "ratios": rat, "tokens_equal": same,
                      "tokens_per_s": {arm: {mode: round(m["tokens_per_s"], 1) for mode, m in modes.items()}
                                       for arm, modes in median.items()}}))


if __name__ == "__main__":
    main()
