"""Row-sharded tables over all-to-all: per-rank memory, step time and bytes moved, measured on
1, 2 and 4 CPU ranks (gloo), against what an all-reduce design would move; then a projection
for Engram-27B on 8 and 64 GPUs from unique-row ratios measured on our corpus.

Measured: one table of 4M rows x 64 (float32) with SparseRowAdam (full moments); each rank
looks up 65,536 Zipf(1.2) ids per step (hot rows spread over the table, as hashing spreads
them), backward, optimizer step. W = 1 is the plain in-memory table. Bytes are counted from
the exchanged splits (what leaves a rank), not estimated. The peers move:
  - dense all-reduce of the table gradient (a replicated table, DDP-style): 2 (W-1)/W R E 4 B;
  - sparse all-gather of (id, gradient row) pairs: (W-1) U (8 + 4E) B, U unique ids a rank read.
On this 2-core machine W = 4 oversubscribes the cores: its step time is not a speed result.

    python benchmarks/bench_distributed.py [--rows 4000000] [--dim 64] [--ids 65536] [--steps 8]
        [--data runs/tiny/data]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import socket
import statistics
import time
from datetime import timedelta

import numpy as np
import torch

from common import machine


def zipf_rows(rank: int, step: int, n: int, rows: int) -> torch.Tensor:
    """n Zipf(1.2) draws, spread over the rows by a fixed multiplicative hash (hashing spreads
    hot n-grams over the whole table, so over every rank's block)."""
    z = np.random.default_rng(1000 * rank + step).zipf(1.2, size=n).astype(np.uint64)
    return torch.from_numpy(((z * np.uint64(2654435761)) % np.uint64(rows)).astype(np.int64)).view(n, 1)


def exchange_bytes(ids: torch.Tensor, rows: int, world: int, rank: int, dim: int) -> dict[str, int]:
    """What this rank sends in one step: ids to owners, rows to askers, gradients to owners."""
    import torch.distributed as dist

    uniq = torch.unique(ids)
    chunk = math.ceil(rows / world)
    owners = torch.bincount(uniq // chunk, minlength=world)
    asked = torch.empty_like(owners)
    dist.all_to_all_single(asked, owners)
    to_others = int(owners.sum() - owners[rank])
    served = int(asked.sum() - asked[rank])
    return {"unique": int(uniq.numel()), "sent_B": to_others * 8 + served * dim * 4 + to_others * dim * 4}


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    import torch.distributed as dist

    from engram.distributed import ShardedTable
    from engram.memory.in_memory import InMemoryTable
    from engram.train.optim import SparseRowAdam

    try:
        if world > 1:
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
            table = ShardedTable([args.rows], args.dim, sparse=True)
        else:
            table = InMemoryTable([args.rows], args.dim, sparse=True)
        opt = SparseRowAdam([table.weight], lr=1e-3)
        times, sent, unique = [], [], []
        for step in range(args.warmup + args.steps):
            ids = zipf_rows(rank, step, args.ids, args.rows)
            upstream = torch.randn(args.ids, 1, args.dim)
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            (table(ids) * upstream).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if world > 1:
                dist.barrier()
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times.append(dt)
                if world > 1:
                    b = exchange_bytes(ids, args.rows, world, rank, args.dim)
                    sent.append(b["sent_B"])
                    unique.append(b["unique"])
                else:
                    unique.append(int(torch.unique(ids).numel()))
        state = sum(v.numel() * v.element_size() for v in opt.state[table.weight].values()
                    if isinstance(v, torch.Tensor))
        results.put((rank, {"step_s": statistics.median(times), "sent_B": statistics.median(sent) if sent else 0,
                            "unique": statistics.median(unique),
                            "table_B": table.weight.numel() * table.weight.element_size(), "state_B": state,
                            "peak_rss_B": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    except BaseException as e:
        results.put((rank, {"error": f"{type(e).__name__}: {e}"}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def measure(world: int, args) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = dict(results.get(timeout=900) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [v["error"] for v in out.values() if "error" in v]
    if errors:
        raise RuntimeError(f"{world} ranks: {errors[0]}")
    return [out[r] for r in range(world)]


def unique_ratios(data_dir: str | None, tokens_per_rank: list[int]) -> dict[int, tuple[float, int]] | None:
    """{tokens: (unique rows / lookups, tokens actually hashed)} for one rank's tokens of a
    step, hashed with Engram-27B's layout (2 layers x 16 heads x 2,262,400 rows) over our
    corpus's compressed ids (at most the whole training split)."""
    from engram.hashing.compression import CompressedTokenizer
    from engram.hashing.ngram import NgramHasher
    from engram.data.dataset import PreparedData
    from engram.train.loop import dataset_sizes, preset_config

    if not data_dir or not os.path.isdir(data_dir):
        return None
    data = PreparedData.open(data_dir)
    compression = CompressedTokenizer.from_tokenizer(data.tokenizer)
    config = preset_config("engram_27b", **dataset_sizes(data, compression))
    hasher = NgramHasher.from_config(config.engram)
    tokens = torch.from_numpy(np.asarray(data.train.tokens, dtype=np.int64))
    out = {}
    for n in tokens_per_rank:
        used = min(n, (len(tokens) // 4096) * 4096)  # our corpus may be smaller than a rank's share
        ids = torch.from_numpy(compression.lookup_table)[tokens[:used]].view(-1, 4096)  # 4096-token sequences
        rows = hasher.hash(ids)
        out[n] = (_unique_rows(rows) / sum(r.numel() for r in rows.values()), used)
    return out


def _unique_rows(rows: dict[int, torch.Tensor]) -> int:
    """Distinct (layer, head, row) triples among a batch's lookups."""
    total = 0
    for r in rows.values():
        flat = r.reshape(-1, r.shape[-1])
        for h in range(flat.shape[1]):
            total += int(torch.unique(flat[:, h]).numel())
    return total


def projection(ratio: float | None, ranks: int, tokens_per_rank: int) -> dict:
    """Engram-27B per rank per step: our all-to-all (ids 8 B, rows and gradients bf16 80-dim)
    against a dense all-reduce of both tables' fp32 gradients."""
    lookups = tokens_per_rank * 2 * 16
    u = lookups * (ratio if ratio is not None else 1.0)
    away = (ranks - 1) / ranks  # the share of ids owned by other ranks
    ours = u * away * (8 + 2 * 80 * 2)
    table_elems = 2 * 16 * 2_262_400 * 80
    allreduce = 2 * away * table_elems * 4
    return {"ranks": ranks, "tokens_per_rank": tokens_per_rank, "unique_ratio": ratio, "ours_B": ours,
            "allreduce_B": allreduce, "ratio": allreduce / ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--ids", type=int, default=65_536)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--data", default="runs/tiny/data", help="a prepared dataset for the unique-row ratios")
    args = ap.parse_args()
    result = {"benchmark": "bench_distributed", "machine": machine(), "rows": args.rows, "dim": args.dim,
              "ids_per_rank": args.ids, "steps": args.steps, "measured": {}, "projection": []}
    print(f"bench_distributed: table {args.rows:,} x {args.dim} fp32 + SparseRowAdam, {args.ids:,} Zipf(1.2) ids "
          f"per rank per step, median of {args.steps} steps\nmachine: {machine()}\n")
    print(f"{'ranks':>5s} {'step ms':>8s} {'unique/rank':>11s} {'table+state MiB/rank':>21s} {'peak RSS MiB':>12s} "
          f"{'sent MiB':>9s} {'dense all-reduce MiB':>21s} {'sparse all-gather MiB':>22s}")
    for world in (int(w) for w in args.worlds.split(",")):
        ranks = measure(world, args)
        step = max(r["step_s"] for r in ranks)
        unique = statistics.mean(r["unique"] for r in ranks)
        mem = max(r["table_B"] + r["state_B"] for r in ranks)
        rss = max(r["peak_rss_B"] for r in ranks)
        sent = statistics.mean(r["sent_B"] for r in ranks)
        dense = 2 * (world - 1) / world * args.rows * args.dim * 4
        gather = (world - 1) * unique * (8 + 4 * args.dim)
        result["measured"][world] = {"step_s": step, "unique_per_rank": unique, "table_state_B_per_rank": mem,
                                     "peak_rss_B": rss, "sent_B_per_rank": sent, "dense_allreduce_B": dense,
                                     "sparse_allgather_B": gather}
        print(f"{world:5d} {1e3 * step:8.1f} {unique:11,.0f} {mem / 2**20:21,.0f} {rss / 2**20:12,.0f} "
              f"{sent / 2**20:9.1f} {dense / 2**20:21,.0f} {gather / 2**20:22.1f}")

    per_rank = {8: 1280 * 4096 // 8, 64: 1280 * 4096 // 64}  # the paper's batch: 1280 x 4096 tokens
    t0 = time.perf_counter()
    ratios = unique_ratios(args.data, sorted(set(per_rank.values())))
    print(f"\nEngram-27B projection (2 tables x 2,262,400 rows x 16 heads x 80 dims; the paper's 1280 x 4096-token "
          f"batch; bf16 rows and gradients; unique-row ratio measured on {args.data if ratios else 'nothing: 1.0'}"
          f", {time.perf_counter() - t0:.0f} s)")
    print(f"{'GPUs':>5s} {'tokens/rank':>12s} {'unique ratio':>13s} {'all-to-all GiB':>15s} {'all-reduce GiB':>15s} "
          f"{'all-reduce / ours':>18s}")
    for ranks, tokens in per_rank.items():
        ratio, used = ratios[tokens] if ratios else (None, None)
        p = projection(ratio, ranks, tokens)
        p["ratio_measured_on_tokens"] = used
        result["projection"].append(p)
        print(f"{ranks:5d} {tokens:12,d} {p['unique_ratio'] or 1.0:13.3f} {p['ours_B'] / 2**30:15.2f} "
              f"{p['allreduce_B'] / 2**30:15.1f} {p['ratio']:18.0f}")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
