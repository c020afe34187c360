"""`engram serve`: a run (or an exported folder) behind vLLM's OpenAI-compatible server."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from .args import UserError, existing_dir, positive_int


def cmd_serve(args: argparse.Namespace) -> None:
    """Serve a run's newest good checkpoint (or an export-hf folder) with vLLM: the OpenAI API
    (completions, chat, streaming) at http://HOST:PORT/v1. Any other option goes to vLLM
    (e.g. --max-num-seqs 64 --enable-prefix-caching)."""
    from engram.runs import is_hf_folder
    from engram.vllm_plugin.launch import INSTALL_HINT, server_command, vllm_installed

    names = [n for n, _ in args.overlay]
    if len(set(names)) != len(names):
        raise UserError(f"--overlay gives a name twice ({sorted(n for n in set(names) if names.count(n) > 1)[0]!r}); "
                        "each served overlay needs its own name")
    if not vllm_installed():
        raise UserError(f"engram serve runs vLLM, which is not installed in this Python ({sys.executable}): "
                        f"{INSTALL_HINT}")
    if args.cache_rows and not args.tables:
        raise UserError("--cache-rows needs --tables (a folder made by engram offload)")
    name = args.name or Path(args.run).resolve().name
    with tempfile.TemporaryDirectory(prefix="engram-serve-") as scratch:
        folder = Path(args.run)
        if not is_hf_folder(folder):
            from engram.hf.export import export_run

            folder = Path(scratch) / name
            ckpt = export_run(args.run, folder, warn=lambda m: print(m, file=sys.stderr))
            print(f"engram serve: exported {ckpt} for vLLM", file=sys.stderr)
        cmd = server_command(folder, name=name, host=args.host, port=args.port, dtype=args.dtype,
                             tables=args.tables, cache_rows=args.cache_rows, overlays=dict(args.overlay),
                             extra=args.vllm_args)
        print(f"engram serve: {' '.join(cmd)}", file=sys.stderr)
        code = subprocess.call(cmd)
    if code:
        raise SystemExit(code)


def named_overlay(value: str) -> tuple[str, str]:
    """NAME=DIR: an overlay folder served under a name requests select it by."""
    from engram.memory.overlay import OVERLAY_JSON
    from engram.memory.overlay_mix import NAME

    name, sep, folder = value.partition("=")
    if not sep or not NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{value!r}: give NAME=DIR, NAME of letters, digits, '_', '.', '-'")
    if not (Path(folder) / OVERLAY_JSON).is_file():
        raise argparse.ArgumentTypeError(f"{folder!r} is not an overlay folder (no {OVERLAY_JSON}; make one with "
                                         "engram memory forget|write ... --overlay DIR)")
    return name, folder


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    p.add_argument("run", type=existing_dir, help="run folder (its newest good checkpoint) or export-hf folder")
    p.add_argument("--host", help="address to listen on (vLLM's default: all)")
    p.add_argument("--port", type=positive_int, help="port (vLLM's default: 8000)")
    p.add_argument("--name", help="the model name clients ask for (default: the folder's name)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--tables", type=existing_dir, help="serve the Engram tables from this engram offload folder")
    p.add_argument("--cache-rows", type=positive_int, help="with --tables: hot rows kept in memory")
    p.add_argument("--overlay", type=named_overlay, action="append", default=[], metavar="NAME=DIR",
                   help="load this overlay (engram memory ... --overlay) under NAME; a request selects it with "
                        '"vllm_xargs": {"engram_overlays": "NAME"} (repeatable)')
    p.set_defaults(vllm_args=[])  # every option engram does not know, passed to vLLM
    p.set_defaults(func=cmd_serve)
