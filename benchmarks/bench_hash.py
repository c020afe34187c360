"""Hashing throughput: NgramHasher (eager and compiled kernels) vs the reference's per-head numpy.

The demo's config: layers [1, 15], N = 3, 8 heads per order, 646,400 rows per order,
DeepSeek-V3's compressed vocabulary (98,627 ids); batch 8 x 4096 compressed ids. Every run
checks that all kernels give the reference's rows bit for bit. Prints a table, then one JSON line.

    python benchmarks/bench_hash.py [--batch 8] [--seq 4096] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from common import machine
from engram import NgramHasher
from engram.compat.numpy_reference import numpy_hash, numpy_layout

DEMO = dict(layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8, rows_per_head=[646400, 646400],
            compressed_vocab_size=98627, pad_id=2, seed=0)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm caches (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    ids_np = rng.integers(0, DEMO["compressed_vocab_size"], size=(args.batch, args.seq), dtype=np.int64)
    ids = torch.from_numpy(ids_np)
    tokens = args.batch * args.seq

    mults, primes = numpy_layout(DEMO["layer_ids"], DEMO["max_ngram_size"], DEMO["n_head_per_ngram"],
                                 DEMO["rows_per_head"], DEMO["compressed_vocab_size"], DEMO["seed"])
    reference = numpy_hash(ids_np, DEMO["layer_ids"], mults, primes, DEMO["pad_id"])

    def run_reference():
        numpy_hash(ids_np, DEMO["layer_ids"], mults, primes, DEMO["pad_id"])

    results = {"reference (numpy, per head)": (median_seconds(run_reference, args.repeats), True, 0.0)}
    for kernel in ("eager", "compiled"):
        hasher = NgramHasher(**DEMO, kernel=kernel)
        t0 = time.perf_counter()
        rows = hasher.hash(ids)  # the compiled kernel compiles here
        first_call = time.perf_counter() - t0
        exact = all(np.array_equal(rows[l].numpy(), reference[l]) for l in DEMO["layer_ids"])
        results[f"engram NgramHasher ({kernel})"] = (median_seconds(lambda: hasher.hash(ids), args.repeats),
                                                     exact, first_call)

    base = results["reference (numpy, per head)"][0]
    print(f"hashing {args.batch} x {args.seq} compressed ids, layers {DEMO['layer_ids']}, N=3, 8 heads; "
          f"median of {args.repeats}\nmachine: {machine()}\n")
    print(f"{'implementation':32s} {'ms':>8s} {'Mtok/s':>8s} {'vs ref':>7s} {'exact':>6s} {'1st call s':>10s}")
    for name, (sec, exact, first) in results.items():
        print(f"{name:32s} {sec * 1e3:8.2f} {tokens / sec / 1e6:8.2f} {base / sec:6.1f}x {str(exact):>6s} {first:10.2f}")
    summary = {
        "benchmark": "bench_hash", "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "machine": machine(),
        "reference_ms": round(base * 1e3, 3),
        "eager_ms": round(results["engram NgramHasher (eager)"][0] * 1e3, 3),
        "compiled_ms": round(results["engram NgramHasher (compiled)"][0] * 1e3, 3),
        "ratio_eager": round(base / results["engram NgramHasher (eager)"][0], 2),
        "ratio_compiled": round(base / results["engram NgramHasher (compiled)"][0], 2),
        "compile_s": round(results["engram NgramHasher (compiled)"][2], 2),
        "bit_exact": all(r[1] for r in results.values()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
