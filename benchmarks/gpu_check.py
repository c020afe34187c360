"""One command for a lent GPU (under 8 minutes on one): is the engine right there, and how fast.

Checks, on CUDA:
  parity     bf16 autocast vs fp32 forward of the same weights (loss difference, top-1
             agreement) and the fp32 gate of Engram under a large hidden state;
  compile    torch.compile(fullgraph=True) training step and one-token decode step equal
             eager (and how long compiling took);
  host table the paper's offload protocol: Engram in block 2 (0-based 1), its table in
             pinned host memory with prefetch on a side stream, against the same table in
             GPU memory; outputs must be bit-identical; throughput ratio over 512 sequences
             of lengths U(100, 1024) (forward / prefill, one sequence at a time);
  speed      training tokens/s (fp32, bf16 autocast) and decoding tokens/s (batch 1, 8).
On a CPU it runs what it can on smaller sizes and names what it skipped. Prints a table,
then one JSON line; save the output to benchmarks/results/DATE_gpu_check_<gpu>.txt.

    python benchmarks/gpu_check.py [--sequences 512] [--table-gib 4]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time

import torch
import torch.nn.functional as F

from bench_engine import SHAPE, engram_config, our_decode
from common import machine
from engram import EngramLM
from engram.memory import HostTable


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step(model, ids, bf16: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(ids[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach()


def check_parity(model, ids) -> dict:
    """bf16 autocast against fp32 on the same weights."""
    model.eval()
    with torch.no_grad():
        ref = model(ids[:, :-1]).logits.float()
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            low = model(ids[:, :-1]).logits.float()
    target = ids[:, 1:].flatten()
    loss_ref = F.cross_entropy(ref.flatten(0, 1), target).item()
    loss_low = F.cross_entropy(low.flatten(0, 1), target).item()
    agree = (ref.argmax(-1) == low.argmax(-1)).float().mean().item()
    # the gate logit runs in fp32 whatever the autocast dtype: a hidden state with norm 1e4
    engram = next(b.engram for b in model.blocks if b.engram is not None)
    D = SHAPE["hidden_size"]
    h = torch.randn(2, 16, D, device=ids.device)
    h = 1e4 * h / h.norm(dim=-1, keepdim=True)
    rows = model.hasher.hash(model.compress(ids[:2, :16]))[engram.layer_id]
    with torch.no_grad():
        _, g32 = engram(h, rows, return_gates=True)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16):
            _, gbf = engram(h, rows, return_gates=True)
    gate_diff = (g32.float() - gbf.float()).abs().max().item()
    ok = abs(loss_low - loss_ref) < 0.02 and agree > 0.9 and gate_diff < 2e-2
    return {"parity_loss_fp32": loss_ref, "parity_loss_bf16": loss_low, "parity_top1_agree": agree,
            "parity_gate_max_diff": gate_diff, "parity_ok": ok}


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def check_compile(model, ids, device) -> dict:
    """fullgraph compile of the training step and the decode step, against eager."""
    out = {}
    model.train()
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(0)
    eager_loss = train_step(model, ids, bf16=False)
    eager_grad = flat_grads(model)
    t0 = time.perf_counter()
    compiled_loss = train_step(compiled, ids, bf16=False)
    sync(device)
    out["compile_train_s"] = time.perf_counter() - t0
    compiled_grad = flat_grads(model)
    out["compile_train_loss_diff"] = abs(eager_loss.item() - compiled_loss.item())
    out["compile_train_grad_max_diff"] = (eager_grad - compiled_grad).abs().max().item()
    model.eval()
    with torch.no_grad():
        prompt = ids[:1, :32]
        state = model(prompt, use_cache=True).state
        token = ids[:1, 32:33]
        eager_next = model(token, copy.deepcopy(state)).logits
        t0 = time.perf_counter()
        compiled_next = compiled(token, copy.deepcopy(state)).logits
        sync(device)
        out["compile_decode_s"] = time.perf_counter() - t0
    out["compile_decode_max_diff"] = (eager_next - compiled_next).abs().max().item()
    out["compile_ok"] = (out["compile_train_loss_diff"] < 1e-3 and out["compile_train_grad_max_diff"] < 1e-3
                         and out["compile_decode_max_diff"] < 1e-3)
    return out


def check_host_table(device, sequences: int, table_gib: float, max_len: int) -> dict:
    """The paper's protocol: one Engram layer in block 2, table in pinned host memory + prefetch."""
    dense, _ = engram_config()
    base = dataclasses.replace(dense, max_seq_len=1024)
    rows = int(table_gib * 2**30 / 4 / 16 / 16)  # fp32, 16 heads x 16 dims
    cfg = dataclasses.replace(base, engram=dataclasses.replace(
        engram_config()[1].engram, layer_ids=(1,), rows_per_head=(rows, rows)))
    torch.manual_seed(0)
    model = EngramLM(cfg, device=device).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(100, max_len + 1, (sequences,), generator=gen).tolist()
    seqs = [torch.randint(0, cfg.vocab_size, (1, n), generator=gen).to(device) for n in lengths]

    @torch.no_grad()
    def run():
        return [model(s).logits[:, -1] for s in seqs]

    resident_out = run()
    t_resident = timed(run, device, 3)
    resident = model.blocks[1].engram.table
    host = HostTable.from_table(resident)
    model.set_table(1, host)
    host_out = run()
    t_host = timed(run, device, 3)
    model.set_table(1, resident)
    exact = all(torch.equal(a, b) for a, b in zip(resident_out, host_out))
    tokens = sum(lengths)
    return {"host_sequences": sequences, "host_table_gib": table_gib, "host_exact": exact,
            "host_pinned": host.pinned,
            "resident_tok_s": tokens / t_resident, "host_tok_s": tokens / t_host,
            "host_vs_resident": t_resident / t_host}


def speed(model, device, batch: int, seq: int, repeats: int) -> dict:
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq + 1), device=device)
    model.train()
    out = {f"train_tok_s_{name}": batch * seq / timed(lambda: train_step(model, ids, bf16), device, repeats)
           for name, bf16 in (("fp32", False), ("bf16", True))}
    model.eval()
    for b in (1, 8):
        prompt = torch.randint(0, SHAPE["vocab_size"], (b, 64), device=device)
        out[f"decode_tok_s_b{b}"] = b * 64 / timed(lambda: our_decode(model, prompt, 64), device, repeats)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=None, help="host-table protocol sequences (GPU 512, CPU 16)")
    ap.add_argument("--table-gib", type=float, default=None, help="host-table size (GPU 4 GiB, CPU 0.25)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sequences = args.sequences or (512 if cuda else 16)
    table_gib = args.table_gib or (4.0 if cuda else 0.25)
    skipped = [] if cuda else ["pinned host memory and side-stream prefetch (no CUDA)",
                               f"paper-size host protocol (ran {sequences} sequences, {table_gib} GiB table)",
                               "GPU throughput (CPU numbers instead)"]
    torch.manual_seed(0)
    _, cfg = engram_config(table_ratio=10.0 if cuda else 2.0)
    # dense table gradients (the default; the paper's recipe: dense Adam) so the whole training
    # step is one graph; sparse ones run their gather between graphs (tests/unit/test_compile.py)
    model = EngramLM(cfg, device=device)
    ids = torch.randint(0, SHAPE["vocab_size"], (8, 257), device=device)
    result = {"benchmark": "gpu_check", "machine": machine(), "device": torch.cuda.get_device_name() if cuda
              else "cpu", "skipped": skipped}
    t0 = time.perf_counter()
    result.update(check_parity(model, ids))
    result.update(check_compile(model, ids[:, :129] if not cuda else ids, device))
    result.update(check_host_table(device, sequences, table_gib, 1024 if cuda else 256))
    result.update(speed(model, device, 8 if cuda else 4, 256 if cuda else 128, args.repeats))
    result["seconds"] = time.perf_counter() - t0

    print(f"gpu_check on {result['device']}; machine: {result['machine']}\n")
    print(f"{'check':12s} {'result':>8s}  numbers")
    print(f"{'parity':12s} {'ok' if result['parity_ok'] else 'FAIL':>8s}  loss fp32 {result['parity_loss_fp32']:.4f} "
          f"bf16 {result['parity_loss_bf16']:.4f}, top-1 agree {result['parity_top1_agree']:.3f}, "
          f"gate |fp32 - bf16| at norm 1e4 {result['parity_gate_max_diff']:.2e}")
    print(f"{'compile':12s} {'ok' if result['compile_ok'] else 'FAIL':>8s}  train {result['compile_train_s']:.0f} s to "
          f"compile, loss diff {result['compile_train_loss_diff']:.1e}, grad diff "
          f"{result['compile_train_grad_max_diff']:.1e}; decode diff {result['compile_decode_max_diff']:.1e}")
    print(f"{'host table':12s} {'ok' if result['host_exact'] else 'FAIL':>8s}  {sequences} sequences, "
          f"{table_gib} GiB table: resident {result['resident_tok_s']:,.0f} tok/s, host "
          f"{result['host_tok_s']:,.0f} tok/s, ratio {result['host_vs_resident']:.3f}")
    print(f"{'speed':12s} {'':>8s}  train fp32 {result['train_tok_s_fp32']:,.0f} tok/s, bf16 "
          f"{result['train_tok_s_bf16']:,.0f}; decode b1 {result['decode_tok_s_b1']:,.0f}, b8 "
          f"{result['decode_tok_s_b8']:,.0f} tok/s")
    for s in skipped:
        print(f"skipped: {s}")
    print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
