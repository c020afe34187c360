"""The engine, side by side in one run: Engram's cost in training and decoding, our backbone
against transformers' Llama of the same shape, eager vs compiled and fp32 vs bf16 autocast
training, and the grouped MoE against the per-expert loop.

Shape (issue 10): width 256, 8 blocks, GQA 8/4, SwiGLU 768, vocab 8192, M = 1, no MoE;
the Engram model adds Engram at blocks 1 and 4 with tables ~10x the backbone, on the very
same backbone tensors as the model without it. Every comparison interleaves its arms (a, b, a, b, ...) and reports the median of the per-pair
ratios, which cancels the machine's drift better than a ratio of medians. Prints a table,
then one JSON line.

    python benchmarks/bench_engine.py [--repeats 7] [--skip-compile] [--skip-hf] [--skip-bf16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch
import torch.nn.functional as F

from common import machine
from engram import EngramLM, count_params
from engram.config import EngramConfig, ModelConfig
from engram.train.system import tune_malloc

SHAPE = dict(vocab_size=8192, hidden_size=256, n_layers=8, n_heads=8, n_kv_heads=4, mlp_hidden_size=768,
             n_streams=1, max_seq_len=1024, moe=None)


def engram_config(table_ratio: float = 10.0) -> tuple[ModelConfig, ModelConfig]:
    """(dense, engram): the issue's shape, and the same with Engram whose tables are about
    `table_ratio` x the backbone (embedding and head included)."""
    dense = ModelConfig(**SHAPE)
    backbone = count_params(dense)["numel"]
    heads, dim = 16, 16  # 2 orders x 8 heads, 16-dim rows (d_mem 256), as in presets.small
    rows = int(table_ratio * backbone / (2 * heads * dim))  # rows per head; 2 Engram layers
    engram = EngramConfig(compressed_vocab_size=SHAPE["vocab_size"], pad_id=0, layer_ids=(1, 4),
                          rows_per_head=(rows, rows), max_ngram_size=3, n_head_per_ngram=8,
                          n_embed_per_ngram=128)
    return dense, dataclasses.replace(dense, engram=engram)


def shared_backbone(dense_cfg: ModelConfig, engram_model: EngramLM) -> EngramLM:
    """The model without Engram on the very tensors of `engram_model`'s backbone. Two models of
    one shape built apart run up to 20% apart here (where their weights land in memory:
    docs/LOG.md); on shared tensors the two arms differ only by Engram's own work."""
    dense = EngramLM(dense_cfg)
    weights = engram_model.state_dict()
    dense.load_state_dict({k: weights[k] for k in dense.state_dict()}, assign=True)
    return dense


def interleaved(arms: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each arm, the arms taking turns; one warm-up call each first."""
    for fn in arms.values():
        fn()
    times = {k: [] for k in arms}
    for _ in range(repeats):
        for k, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def pair_ratio(times: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over interleaved pairs of time(slow) / time(fast) = speed(fast) / speed(slow)."""
    return statistics.median(s / f for f, s in zip(times[fast], times[slow]))


# ---------------------------------------------------------------- our model
def our_train_step(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(ids[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


@torch.no_grad()
def our_decode(model, prompt, steps, step_fn=None):
    """Greedy: prefill eagerly, then `steps` one-token steps through `step_fn` (default the
    model itself; a `torch.compile`d model for the compiled rows), in a state sized to fit."""
    state = model.new_state(prompt.shape[0], max_len=prompt.shape[1] + steps)
    out = model(prompt, state)
    token = out.logits[:, -1:].argmax(-1)
    step_fn = model if step_fn is None else step_fn
    for _ in range(steps):
        token = step_fn(token, state).logits[:, -1:].argmax(-1)
    return token


# ---------------------------------------------------------------- transformers' Llama
def hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                      intermediate_size=SHAPE["mlp_hidden_size"], num_hidden_layers=SHAPE["n_layers"],
                      num_attention_heads=SHAPE["n_heads"], num_key_value_heads=SHAPE["n_kv_heads"],
                      max_position_embeddings=SHAPE["max_seq_len"], rms_norm_eps=1e-6, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def hf_train_step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids[:, :-1]).logits
    F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()


@torch.no_grad()
def hf_decode(model, prompt, steps):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return token


# ---------------------------------------------------------------- MoE
def moe_rows(repeats: int) -> dict:
    """Grouped MoE forward+backward against the per-expert loop it replaced (the oracle)."""
    from engram.config import MoEConfig
    from engram.model.moe import MoE

    torch.manual_seed(0)
    moe = MoE(256, MoEConfig(n_routed_experts=16, n_shared_experts=1, top_k=2, expert_hidden_size=256))
    x = torch.randn(8 * 256, 256, requires_grad=True)

    def run(loop: bool):
        def fn():
            moe.zero_grad(set_to_none=True)
            moe(x, loop=loop).square().mean().backward()
        return fn

    times = interleaved({"loop": run(True), "grouped": run(False)}, repeats)
    return {"moe_loop_ms": 1e3 * statistics.median(times["loop"]),
            "moe_grouped_ms": 1e3 * statistics.median(times["grouped"]),
            "moe_grouped_speedup": pair_ratio(times, "grouped", "loop")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-compile", action="store_true", help="skip the torch.compile rows (minutes to compile)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument("--skip-bf16", action="store_true", help="skip the bf16 autocast rows (minutes on a CPU "
                    "without bf16 instructions)")
    args = ap.parse_args()
    tune_malloc()
    torch.manual_seed(0)
    dense_cfg, engram_cfg = engram_config()
    counts = {"dense": count_params(dense_cfg), "engram": count_params(engram_cfg)}
    models = {"engram": EngramLM(engram_cfg).use_sparse_table_grads()}  # as sparse_adam trains it
    models["dense"] = shared_backbone(dense_cfg, models["engram"])
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq + 1))
    prompts = {b: torch.randint(0, SHAPE["vocab_size"], (b, args.prompt)) for b in (1, 8)}
    result = {"benchmark": "bench_engine", "machine": machine(), "batch": args.batch, "seq": args.seq,
              "prompt": args.prompt, "decode_steps": args.decode_steps, "repeats": args.repeats,
              "table_to_backbone": round(counts["engram"]["engram_tables_params"] / counts["dense"]["numel"], 2)}
    rows = []  # (comparison, a, b, value of a, value of b, unit, ratio, target)

    # 1. Engram's cost: train step and decode, with vs without Engram
    for m in models.values():
        m.train()
    t = interleaved({k: (lambda m=m: our_train_step(m, ids)) for k, m in models.items()}, args.repeats)
    train_ratio = pair_ratio(t, "engram", "dense")  # speed(engram) / speed(dense)
    tok = {k: args.batch * args.seq / statistics.median(v) for k, v in t.items()}
    rows.append(("train, Engram vs none", "engram", "dense", tok["engram"], tok["dense"], "tok/s", train_ratio, 0.97))
    result.update(train_tok_s_dense=tok["dense"], train_tok_s_engram=tok["engram"], train_engram_ratio=train_ratio)
    for m in models.values():
        m.eval()
    for b, prompt in prompts.items():
        t = interleaved({k: (lambda m=m: our_decode(m, prompt, args.decode_steps)) for k, m in models.items()},
                        args.repeats)
        ratio = pair_ratio(t, "engram", "dense")
        tok = {k: b * args.decode_steps / statistics.median(v) for k, v in t.items()}
        rows.append((f"decode batch {b}, Engram vs none", "engram", "dense", tok["engram"], tok["dense"], "tok/s",
                     ratio, 0.95))
        result.update({f"decode_b{b}_tok_s_dense": tok["dense"], f"decode_b{b}_tok_s_engram": tok["engram"],
                       f"decode_b{b}_engram_ratio": ratio})

    if not args.skip_compile:  # the same, with the one-token step compiled (fullgraph, static state)
        steps = {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
        for b, prompt in prompts.items():
            t0 = time.perf_counter()
            for k, m in models.items():
                our_decode(m, prompt, 2, steps[k])  # compiles this batch size
            result[f"compile_decode_b{b}_s"] = time.perf_counter() - t0
            t = interleaved({k: (lambda m=m, k=k: our_decode(m, prompt, args.decode_steps, steps[k]))
                             for k, m in models.items()}, args.repeats)
            ratio = pair_ratio(t, "engram", "dense")
            tok = {k: b * args.decode_steps / statistics.median(v) for k, v in t.items()}
            rows.append((f"compiled decode b{b}, Engram vs none", "engram", "dense", tok["engram"], tok["dense"],
                         "tok/s", ratio, 0.95))
            result.update({f"compiled_decode_b{b}_tok_s_dense": tok["dense"],
                           f"compiled_decode_b{b}_tok_s_engram": tok["engram"],
                           f"compiled_decode_b{b}_engram_ratio": ratio})

    # 2. our dense backbone vs transformers' LlamaForCausalLM of the same shape
    if not args.skip_hf:
        hf = hf_llama()
        ours = models["dense"]
        hf.train(), ours.train()
        t = interleaved({"ours": lambda: our_train_step(ours, ids), "hf": lambda: hf_train_step(hf, ids)},
                        args.repeats)
        ratio = pair_ratio(t, "ours", "hf")
        tok = {k: args.batch * args.seq / statistics.median(v) for k, v in t.items()}
        rows.append(("train, ours vs HF Llama", "ours", "hf", tok["ours"], tok["hf"], "tok/s", ratio, 1.0))
        result.update(train_tok_s_hf=tok["hf"], train_vs_hf=ratio)
        hf.eval(), ours.eval()
        for b, prompt in prompts.items():
            t = interleaved({"ours": lambda: our_decode(ours, prompt, args.decode_steps),
                             "hf": lambda: hf_decode(hf, prompt, args.decode_steps)}, args.repeats)
            ratio = pair_ratio(t, "ours", "hf")
            tok = {k: b * args.decode_steps / statistics.median(v) for k, v in t.items()}
            rows.append((f"decode batch {b}, ours vs HF Llama", "ours", "hf", tok["ours"], tok["hf"], "tok/s",
                         ratio, 1.0))
            result.update({f"decode_b{b}_tok_s_hf": tok["hf"], f"decode_b{b}_vs_hf": ratio})
        del hf

    # 3. training: fp32 vs bf16 autocast, eager vs compiled (the Engram model)
    model = models["engram"].train()
    arms = {"eager fp32": lambda: our_train_step(model, ids)}
    if not args.skip_bf16:
        arms["eager bf16"] = lambda: our_train_step(model, ids, autocast=True)
    if not args.skip_compile:
        compiled = torch.compile(model)
        t0 = time.perf_counter()
        our_train_step(compiled, ids)  # compiles
        result["compile_s"] = time.perf_counter() - t0
        arms["compiled fp32"] = lambda: our_train_step(compiled, ids)
        if not args.skip_bf16:
            arms["compiled bf16"] = lambda: our_train_step(compiled, ids, autocast=True)
    t = interleaved(arms, args.repeats)
    for k in arms:
        if k == "eager fp32":
            continue
        ratio = pair_ratio(t, k, "eager fp32")
        tok = {a: args.batch * args.seq / statistics.median(t[a]) for a in (k, "eager fp32")}
        rows.append((f"train, {k} vs eager fp32", k, "eager fp32", tok[k], tok["eager fp32"], "tok/s", ratio, None))
        result[f"train_{k.replace(' ', '_')}_speedup"] = ratio
    result["train_tok_s_eager_fp32"] = args.batch * args.seq / statistics.median(t["eager fp32"])

    # 4. MoE: grouped vs loop
    moe = moe_rows(args.repeats)
    rows.append(("MoE fwd+bwd, grouped vs loop", "grouped", "loop", moe["moe_grouped_ms"], moe["moe_loop_ms"], "ms",
                 moe["moe_grouped_speedup"], None))
    result.update(moe)

    print(f"bench_engine: width 256, 8 blocks, GQA 8/4, SwiGLU 768, vocab 8192, M = 1, no MoE; Engram at blocks "
          f"1, 4 with tables {result['table_to_backbone']}x the backbone; train batch {args.batch} x {args.seq}, "
          f"decode {args.decode_steps} tokens after a {args.prompt}-token prompt; median of {args.repeats} "
          f"interleaved pairs\nmachine: {machine()}\n")
    print(f"{'comparison':38s} {'a':>14s} {'b':>14s} {'unit':>6s} {'a/b speed':>10s} {'target':>7s}")
    for name, a, b, va, vb, unit, ratio, target in rows:
        mark = "" if target is None else (" ok" if ratio >= target else " MISS")
        print(f"{name:38s} {va:14.1f} {vb:14.1f} {unit:>6s} {ratio:10.3f} "
              f"{'' if target is None else f'>={target}':>7s}{mark}")
    if "compile_s" in result:
        print(f"\ncompiling took {result['compile_s']:.0f} s (training step), "
              f"{result['compile_decode_b1_s']:.0f} s and {result['compile_decode_b8_s']:.0f} s (decode steps "
              "of both models, batch 1 and 8)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
