"""Memory of several vLLM engines on one node serving the same Engram model: tables resident
in each engine, against one copy shared by all of them (the tables offloaded into /dev/shm, i.e.
host memory, or onto disk, memory-mapped read-only by every engine).

Each engine is a separate `vllm.LLM` process tree (its engine core and worker) that has served
the same batch, so the tables' rows have been read. Reported per arm: the proportional set size
(PSS: shared pages split between the processes that map them) summed over every engine's
processes, without the pages of the mapped table files; the table files, counted once at their
full size (in /dev/shm they occupy memory whether mapped or not); and the two together. Runs in the vLLM venv; prints a table, and the last line is one
JSON object.

    python benchmarks/bench_serve_memory.py [--engines 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def child(folder: str, overrides: str) -> None:
    """One engine: serve a batch, say READY, stay alive until stdin closes."""
    import numpy as np
    from vllm import LLM, SamplingParams

    llm = LLM(folder, dtype="float32", enforce_eager=True, max_model_len=512, skip_tokenizer_init=True,
              hf_overrides=json.loads(overrides), seed=0)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, 8192, 400).tolist()} for _ in range(32)]
    llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    print("READY", flush=True)
    sys.stdin.read()


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        todo += [int(k) for k in kids]
    return out


def pss_bytes(pid: int, tables: str | None) -> tuple[int, int]:
    """(PSS of the process, PSS of its mappings of files under `tables`), from /proc smaps."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0, 0
    total = in_tables = 0
    mapped_table = False
    for line in text.splitlines():
        head = line.split()
        if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
            mapped_table = tables is not None and len(head) >= 6 and head[5].startswith(tables)
        elif head and head[0] == "Pss:":
            total += int(head[1]) * 1024
            in_tables += int(head[1]) * 1024 if mapped_table else 0
    return total, in_tables


def measure(folder: Path, overrides: dict, engines: int, tables: str | None = None) -> tuple[int, int]:
    """PSS summed over every engine's processes: (all of it, the part in files under `tables`)."""
    procs = [subprocess.Popen([sys.executable, __file__, "--child", str(folder), json.dumps(overrides)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(engines)]
    try:
        for p in procs:
            for line in p.stdout:
                if line.startswith("READY"):
                    break
            else:
                raise RuntimeError(f"an engine exited ({p.poll()}) before serving")
        time.sleep(2)
        sizes = [pss_bytes(pid, tables) for p in procs for pid in tree(p.pid)]
        return sum(a for a, _ in sizes), sum(b for _, b in sizes)
    finally:
        for p in procs:
            p.stdin.close()
            p.terminate()
        for p in procs:
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    from bench_serve import write_models

    from engram.cli.main import main as engram_main

    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench_mem_", dir="/dev/shm") as shm:
        paths = write_models(Path(tmp))
        engram_main(["offload", str(paths["engram"]), "--out", f"{shm}/tables"])
        table_bytes = sum(f.stat().st_size for f in Path(paths["tables_fp32"]).glob("*.bin"))
        arms = {"resident in each engine": None,
                "one copy in host memory (/dev/shm)": f"{shm}/tables",
                "one copy on disk (page cache)": str(Path(paths["tables_fp32"]).resolve())}
        dense, _ = measure(paths["no_engram"], {}, args.engines)
        rows = {}
        for name, folder in arms.items():
            overrides = {"engram_tables": folder} if folder else {}
            pss, in_tables = measure(paths["engram"], overrides, args.engines, folder)
            rows[name] = (pss - in_tables, table_bytes if folder else 0, in_tables)
    mib = 1 / 2 ** 20
    print(f"\nbench_serve_memory on {machine()}: {args.engines} engines, Engram tables {table_bytes * mib:.0f} MiB")
    print(f"{'arm':<38}{'PSS, not table files':>21}{'table files once':>18}{'in all':>10}{'vs no Engram':>14}"
          f"{'table pages mapped':>20}  (MiB)")
    print(f"{'the same backbone without Engram':<38}{dense * mib:>21.0f}{0:>18.0f}{dense * mib:>10.0f}{0:>14.0f}{0:>20.0f}")
    out = {}
    for name, (pss, shared, mapped) in rows.items():
        total = pss + shared
        out[name] = {"pss_without_table_files_mib": round(pss * mib, 1), "table_files_mib": round(shared * mib, 1),
                     "total_mib": round(total * mib, 1), "over_no_engram_mib": round((total - dense) * mib, 1),
                     "table_pages_mapped_pss_mib": round(mapped * mib, 1)}
        print(f"{name:<38}{pss * mib:>21.0f}{shared * mib:>18.0f}{total * mib:>10.0f}{(total - dense) * mib:>14.0f}"
              f"{mapped * mib:>20.0f}")
    print(json.dumps({"bench": "serve_memory", "engines": args.engines, "table_mib": round(table_bytes * mib, 1),
                      "no_engram_pss_mib": round(dense * mib, 1), "arms": out}))


if __name__ == "__main__":
    main()
