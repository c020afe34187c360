"""Tables off the compute device: the paper's offload protocol, scaled to this machine.

A `small`-shaped model (M = 4 streams, MoE) with one Engram module in its second block
(block 1, 0-based) and tables 10x its backbone; sequences with lengths drawn uniformly from
100 to 1024 tokens of real text (the default corpus's validation split), run one by one.
Variants, interleaved, medians of --repeats passes, ratios to (a):
  (a) resident table (in memory, the default)      (b) disk table, no prefetch
  (c) disk table with prefetch                       (d) (c) + a TinyLFU hot-row cache, several sizes
The disk table is a memory-mapped file; before every pass its pages are dropped from this
process (MADV_DONTNEED) so each pass maps them in again (the kernel's page cache keeps them:
on this machine "disk" means host DRAM behind the page cache, like the paper's host table).
Within a pass the touched pages stay mapped; the separate RSS probe instead releases them
after every gather (bounded memory) and reports that mode's throughput too.
One cold pass after evicting the page cache (posix_fadvise DONTNEED) is reported separately.
Peak RSS of serving from disk + cache is measured in a separate process. Prints a table,
writes the hit-rate plot, then one JSON line.

    python benchmarks/bench_offload.py [--sequences 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from engram import EngramLM, count_params, presets
from engram.hashing.compression import CompressedTokenizer
from engram.memory.cache import CachedTable
from engram.memory import DiskTable, convert_checkpoint_tables
from engram.model.io import load_model, save_model
from engram.data.dataset import PreparedData, prepare_dataset
from engram.train.system import tune_malloc
from engram.data.tokenizer import special_ids

RESULTS = Path(__file__).parent / "results"


def dataset(cache: Path) -> PreparedData:
    if not (cache / "tokens.json").is_file():
        prepare_dataset(cache, log=lambda *a: None)
    return PreparedData.open(cache)


def config_for(data: PreparedData, ct: CompressedTokenizer, table_ratio: float):
    pad = int(ct.lookup_table[special_ids(data.tokenizer)["pad"] or 0])
    base = presets.small(vocab_size=data.tokenizer.get_vocab_size(), compressed_vocab_size=len(ct), pad_id=pad)
    backbone = count_params(base)["total"] - count_params(base)["engram"]
    e = base.engram
    rows = int(table_ratio * backbone / (e.n_hash_heads * e.row_dim))
    import dataclasses

    engram = dataclasses.replace(e, layer_ids=(1,), rows_per_head=(rows,) * (e.max_ngram_size - 1))
    return dataclasses.replace(base, engram=engram)


def sequences(data: PreparedData, n: int, seed: int) -> list[torch.Tensor]:
    """n windows of validation text with lengths drawn uniformly from 100..1024 (seeded)."""
    rng = np.random.default_rng(seed)
    tokens = data.val.tokens
    out = []
    for length in rng.integers(100, 1025, size=n):
        start = int(rng.integers(0, len(tokens) - length))
        out.append(torch.from_numpy(np.asarray(tokens[start:start + length], dtype=np.int64)).unsqueeze(0))
    return out


def evict_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@torch.no_grad()
def run_pass(model: EngramLM, seqs: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds, seconds blocked on table rows) for one pass over the sequences."""
    waited = 0.0
    t0 = time.perf_counter()
    for ids in seqs:
        waited += model(ids).table_wait_s
    return time.perf_counter() - t0, waited


def disk_model(model_dir: Path, stems: dict[int, Path], *, prefetch: bool, cache_rows: int | None,
               release_every: int | None = None):
    def factory(layer, sizes, dim):
        # release_every=1 unmaps the file pages after every gather (RSS bounded by the cache, at
        # the price of faulting them in again); None leaves them mapped (clean page-cache pages
        # the kernel can reclaim, but they count in RSS)
        table = DiskTable.open(stems[layer], verify=False, release_every=release_every)
        if cache_rows:
            table = CachedTable(table, capacity_rows=cache_rows)
        table.asynchronous = prefetch
        return table

    return load_model(model_dir, table_factory=factory).eval()


def rss_probe(args) -> None:
    """Serve one pass from disk + cache in this fresh process; print peak RSS as JSON."""
    data = dataset(Path(args.data_cache))
    seqs = sequences(data, args.sequences, args.seed)
    stems = {int(k): Path(v) for k, v in json.loads(args.rss_probe).items()}
    model = disk_model(Path(args.model_dir), stems, prefetch=True, cache_rows=args.probe_cache_rows, release_every=1)
    run_pass(model, seqs[:2])
    seconds, _ = run_pass(model, seqs)
    # VmHWM, not ru_maxrss: ru_maxrss carries the parent's peak across fork + exec
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, "tok_s": sum(s.shape[1] for s in seqs) / seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--table-ratio", type=float, default=10.0, help="table parameters / backbone parameters")
    ap.add_argument("--cache-fractions", default="0.0005,0.002,0.01", help="cache sizes as fractions of all rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-cache", default=str(Path.home() / ".cache" / "engram-torch" / "bench-wiki-en"))
    ap.add_argument("--rss-probe", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--probe-cache-rows", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    tune_malloc()
    torch.manual_seed(args.seed)
    if args.rss_probe:
        return rss_probe(args)

    data = dataset(Path(args.data_cache))
    ct = CompressedTokenizer.from_tokenizer(data.tokenizer)
    cfg = config_for(data, ct, args.table_ratio)
    resident = EngramLM(cfg, compression=ct).eval()
    counts = count_params(cfg)
    # a fresh set of sequences for every repeat: caches meet new text, as a server would
    seq_sets = [sequences(data, args.sequences, args.seed + 1 + r) for r in range(args.repeats)]
    seqs = sequences(data, args.sequences, args.seed)  # warm-up and the cold pass
    n_tokens = statistics.median(sum(s.shape[1] for s in ss) for ss in seq_sets)
    work = Path(tempfile.mkdtemp(prefix="engram-offload-"))
    save_model(resident, work / "model")
    stems = convert_checkpoint_tables(work / "model", work / "tables")
    table_bytes = sum(Path(str(s) + ".bin").stat().st_size for s in stems.values())
    num_rows = counts["engram_tables_params"] // cfg.engram.row_dim
    fractions = [float(f) for f in args.cache_fractions.split(",")]
    variants = {"(a) resident": resident,
                "(b) disk": disk_model(work / "model", stems, prefetch=False, cache_rows=None),
                "(c) disk + prefetch": disk_model(work / "model", stems, prefetch=True, cache_rows=None)}
    for f in fractions:
        variants[f"(d) + cache {100 * f:g}%"] = disk_model(work / "model", stems, prefetch=True,
                                                      cache_rows=max(1, int(f * num_rows)))
    disk_tables = {name: m.blocks[1].engram.table for name, m in variants.items() if name != "(a) resident"}

    def drop_pages(name):
        t = disk_tables.get(name)
        base = getattr(t, "backing", t)
        if base is not None:
            base.release_pages()

    # cold pass: page cache evicted, the table comes from the block device
    for stem in stems.values():
        evict_page_cache(Path(str(stem) + ".bin"))
    drop_pages("(c) disk + prefetch")
    cold_s, _ = run_pass(variants["(c) disk + prefetch"], seqs)

    for name, m in variants.items():  # warm-up (and fills the caches), then count from zero
        run_pass(m, seqs)
        if hasattr(m.blocks[1].engram.table, "reset_stats"):
            m.blocks[1].engram.table.reset_stats()
    times = {k: [] for k in variants}
    waits = {k: [] for k in variants}
    tokens = []
    for r in range(args.repeats):
        tokens.append(sum(s.shape[1] for s in seq_sets[r]))
        for name, model in variants.items():
            drop_pages(name)
            seconds, waited = run_pass(model, seq_sets[r])
            times[name].append(seconds)
            waits[name].append(waited)
    # outputs identical across variants (bit-exact tables)
    probe = seqs[0]
    ref = resident(probe).logits
    exact = all(torch.equal(m(probe).logits, ref) for m in variants.values())

    tok_s = {k: statistics.median(n / t for n, t in zip(tokens, v)) for k, v in times.items()}
    ratio = {k: statistics.median(a / b for a, b in zip(times["(a) resident"], v)) for k, v in times.items()}
    hit = {f: variants[f"(d) + cache {100 * f:g}%"].blocks[1].engram.table.stats()["hit_rate"] for f in fractions}

    probe_rows = max(1, int(fractions[0] * num_rows))
    proc = subprocess.run([sys.executable, __file__, "--rss-probe", json.dumps({k: str(v) for k, v in stems.items()}),
                           "--model-dir", str(work / "model"), "--probe-cache-rows", str(probe_rows),
                           "--sequences", str(args.sequences), "--seed", str(args.seed),
                           "--data-cache", args.data_cache], capture_output=True, text=True)
    probe = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    peak_rss, bounded_tok_s = probe.get("peak_rss_mb"), probe.get("tok_s")

    print(f"model: {cfg.n_layers} blocks x {cfg.hidden_size}, M={cfg.n_streams}, Engram at block 1; backbone "
          f"{counts['total'] - counts['engram']:,} params, tables {counts['engram_tables_params']:,} "
          f"({table_bytes / 2**20:,.0f} MiB, {counts['engram_tables_params'] / (counts['total'] - counts['engram']):.1f}x)")
    print(f"{args.sequences} sequences per pass (new ones each pass, ~{n_tokens:,.0f} tokens), lengths U(100, 1024); "
          f"median of {args.repeats} passes\n"
          f"machine: {machine()}\n")
    print(f"{'variant':24s} {'tok/s':>9s} {'vs (a)':>8s} {'waited ms/pass':>15s} {'hit rate':>9s}")
    for name in variants:
        h = next((f"{hit[f]:.3f}" for f in fractions if name == f"(d) + cache {100 * f:g}%"), "")
        print(f"{name:24s} {tok_s[name]:9.0f} {ratio[name]:8.3f} {1e3 * statistics.median(waits[name]):15.1f} {h:>9s}")
    cold_tokens = sum(s.shape[1] for s in seqs)
    print(f"\ncold pass (page cache evicted), disk + prefetch: {cold_tokens / cold_s:.0f} tok/s; outputs bit-exact: {exact}")
    print(f"peak RSS serving from disk with a {100 * fractions[0]:g}% cache (separate process): {peak_rss:,.0f} MB "
          f"vs table file {table_bytes / 2**20:,.0f} MiB; pages released after every gather: {bounded_tok_s:,.0f} tok/s")

    RESULTS.mkdir(exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([100 * f for f in fractions], [hit[f] for f in fractions], "o-")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("cache size (% of table rows)")
    ax.set_ylabel("hit rate (rows)")
    ax.set_title("TinyLFU hot-row cache, real text")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{time.strftime('%Y-%m-%d')}_offload_hit_rate.png")
    best = f"(d) + cache {fractions[-1]:.0%}"
    print(json.dumps({
        "benchmark": "bench_offload", "machine": machine(), "sequences": args.sequences, "tokens_per_pass": n_tokens,
        "repeats": args.repeats, "table_params": counts["engram_tables_params"],
        "table_to_backbone": round(counts["engram_tables_params"] / (counts["total"] - counts["engram"]), 2),
        "resident_tok_s": round(tok_s["(a) resident"], 1), "disk_tok_s": round(tok_s["(b) disk"], 1),
        "prefetch_tok_s": round(tok_s["(c) disk + prefetch"], 1), "prefetch_cache_tok_s": round(tok_s[best], 1),
        "ratio_disk": round(ratio["(b) disk"], 4), "ratio_prefetch": round(ratio["(c) disk + prefetch"], 4),
        "ratio_prefetch_cache": {f"{f:g}": round(ratio[f"(d) + cache {100 * f:g}%"], 4) for f in fractions},
        "cache_hit_rate": {f"{f:g}": round(hit[f], 4) for f in fractions},
        "cold_prefetch_tok_s": round(cold_tokens / cold_s, 1), "peak_rss_mb": peak_rss,
        "bounded_rss_tok_s": bounded_tok_s,
        "table_file_mb": round(table_bytes / 2**20, 1), "bit_exact": exact,
    }))


if __name__ == "__main__":
    main()
