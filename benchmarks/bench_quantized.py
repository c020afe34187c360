"""Quantized tables: bytes, validation loss and gather throughput against fp32 and bf16.

Part 1 (quality): a trained run's tables stored as fp32 (as trained), bf16, int8 (per-row absmax)
and fp8 e4m3 (per row and per 32 values); each served resident through the model, validation loss
on the run's own data; change against fp32.
Part 2 (speed): a table of --rows x --dim; gathers of --batch random rows, each variant resident
in host memory; interleaved passes, medians of --repeats; rows/s and ratio to fp32. A quantized
gather reads 1-byte codes plus scales and dequantizes them; an fp32 gather reads 4 bytes a value.
Prints a table, then one JSON line.

    python benchmarks/bench_quantized.py --run docs/results/runs/full_400steps_seed0 [--rows 4000000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from common import machine
from engram.memory.quantized import QuantizedTable
from engram.memory.in_memory import InMemoryTable
from engram.runs import latest_good_checkpoint, load_checkpoint
from engram.data.dataset import PreparedData
from engram.eval import evaluate

VARIANTS = [("fp32", None, None), ("bf16", None, None), ("int8", "int8", None), ("fp8 row", "fp8", None),
            ("fp8 /32", "fp8", 32)]


def variant_table(weight: torch.Tensor, sizes, name: str, kind: str | None, group: int | None):
    if kind is not None:
        return QuantizedTable.quantize(weight, sizes, kind, group)
    t = InMemoryTable(sizes, weight.shape[1], dtype=torch.bfloat16 if name == "bf16" else torch.float32)
    with torch.no_grad():
        t.weight.copy_(weight)
    t.weight.requires_grad_(False)
    return t


def nbytes(table) -> int:
    return table.nbytes if isinstance(table, QuantizedTable) else table.weight.nbytes


def quality(run: str, windows: int) -> list[dict]:
    model, _ = load_checkpoint(latest_good_checkpoint(run))
    model.eval()
    meta = json.loads((latest_good_checkpoint(run).parent.parent / "run.json").read_text())
    data = PreparedData.open(meta["data_dir"])
    seq_len = meta["train"]["seq_len"]
    tables = {layer: model.blocks[layer].engram.table for layer in model.engram_layers}
    rows = []
    for name, kind, group in VARIANTS:
        if group is not None and any(t.embedding_dim % group for t in tables.values()):
            continue
        served = {layer: variant_table(t.weight.detach(), t.table_sizes, name, kind, group) for layer, t in tables.items()}
        for layer, t in served.items():
            model.set_table(layer, t)
        loss = evaluate(model, data, seq_len, windows)["val_loss"]
        rows.append({"variant": name, "bytes": sum(nbytes(t) for t in served.values()), "val_loss": loss})
    for layer, t in tables.items():
        model.set_table(layer, t)
    for r in rows:
        r["bytes_vs_fp32"] = r["bytes"] / rows[0]["bytes"]
        r["loss_change"] = r["val_loss"] - rows[0]["val_loss"]
    return rows


def speed(n_rows: int, dim: int, batch: int, repeats: int, gathers: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n_rows, dim, generator=g)
    sizes = [n_rows // 4] * 3 + [n_rows - 3 * (n_rows // 4)]
    tables = {name: variant_table(weight, sizes, name, kind, group) for name, kind, group in VARIANTS}
    del weight
    ids = [torch.randint(0, min(sizes), (batch, 1, 4), generator=g) for _ in range(gathers)]
    times: dict[str, list[float]] = {name: [] for name in tables}
    with torch.no_grad():
        for t in tables.values():
            t(ids[0])  # warm up
        for _ in range(repeats):
            for name, t in tables.items():  # interleaved: each pass runs every variant
                start = time.perf_counter()
                for x in ids:
                    t(x)
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, t in tables.items():
        s = statistics.median(times[name])
        rows.append({"variant": name, "bytes": nbytes(t), "rows_per_s": gathers * batch * 4 / s})
    for r in rows:
        r["speed_vs_fp32"] = r["rows_per_s"] / rows[0]["rows_per_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder (its tables and data)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--rows", type=int, default=4_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4096, help="positions per gather (4 heads each)")
    ap.add_argument("--gathers", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(machine())
    q = quality(args.run, args.windows)
    print(f"\nquality: {args.run}, {args.windows} validation windows")
    print(f"{'variant':10s} {'bytes':>12s} {'x fp32':>7s} {'val loss':>9s} {'change':>8s}")
    for r in q:
        print(f"{r['variant']:10s} {r['bytes']:12,d} {r['bytes_vs_fp32']:7.3f} {r['val_loss']:9.4f} "
              f"{r['loss_change']:+8.4f}")
    s = speed(args.rows, args.dim, args.batch, args.repeats, args.gathers)
    print(f"\ngather speed: {args.rows:,} rows x {args.dim}, {args.batch} positions x 4 heads per gather, "
          f"median of {args.repeats} interleaved passes")
    print(f"{'variant':10s} {'bytes':>14s} {'rows/s':>12s} {'x fp32':>7s}")
    for r in s:
        print(f"{r['variant']:10s} {r['bytes']:14,d} {r['rows_per_s']:12,.0f} {r['speed_vs_fp32']:7.2f}")
    print(json.dumps({"benchmark": "bench_quantized", "machine": machine(), "run": args.run, "quality": q,
                      "speed": s, "rows": args.rows, "dim": args.dim}))


if __name__ == "__main__":
    main()
