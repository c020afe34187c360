"""`engram <command>`: parse, call the library, print. User mistakes are one line, exit code 2;
a training run stopped for non-finite steps is one line, exit code 1.

One module per command group: data (demo, data build), train (train, config, experiment),
inference (eval, generate, offload, export-hf, info), analyze, memory (index, locate,
forget, write, replay), serve (vLLM). Set ENGRAM_DEBUG=1 to see the traceback
behind an error line.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import analyze, data, inference, memory, serve, train
from .args import Parser, UserError


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="engram", description="Engram: conditional memory via scalable lookup.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (data, train, inference, analyze, memory, serve):
        group.add_commands(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    from safetensors import SafetensorError

    from engram.train.trainer import TrainingDiverged

    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown and not hasattr(args, "vllm_args"):  # only `serve` passes options on (to vLLM)
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if hasattr(args, "vllm_args"):
            args.vllm_args = [a for a in unknown if a != "--"]
        args.argv = list(sys.argv[1:] if argv is None else argv)  # to relaunch under torchrun
        args.func(args)
    except (UserError, ValueError, FileNotFoundError, UnicodeDecodeError, TrainingDiverged) as e:
        if os.environ.get("ENGRAM_DEBUG"):
            raise
        print(f"engram: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingDiverged) else 2
    except (OSError, SafetensorError) as e:  # a full disk, a missing permission: the system's words, no traceback
        if os.environ.get("ENGRAM_DEBUG"):
            raise
        what = getattr(e, "strerror", None) or str(e)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"engram: error: {what}{where} (nothing half-written is kept; free space or fix the permission and run "
              "it again)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
