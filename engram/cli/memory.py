"""`engram memory index|locate|forget|write|overlay|replay`: what the memory holds for a phrase,
and edits of it that never touch the source run (engram.lifecycle)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import UserError, existing_dir, existing_file, fraction, nonneg_int, out_dir, positive_float, positive_int


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.text_file:
        texts += [line for line in Path(args.text_file).read_text().splitlines() if line.strip()]
    if not texts:
        raise UserError("give the text to act on with --text (repeatable) or --text-file")
    return texts


def cmd_index(args: argparse.Namespace) -> None:
    """Count how often training read each table row, and which n-grams share it (RUN/memory_index)."""
    from engram.lifecycle import index_run

    folder = index_run(args.run, min_count=args.min_count)
    meta = json.loads((folder / "index.json").read_text())
    print(f"wrote {folder} ({meta['source']['tokens']:,} training tokens, partners seen >= {args.min_count} times)")


def cmd_locate(args: argparse.Namespace) -> None:
    """Show, per token and Engram layer, the n-grams of a text, their rows, reads and partners."""
    from engram.lifecycle import locate

    found = locate(args.run, args.text, index=args.index, max_count=args.max_count, max_shared=args.max_shared)
    if args.json:
        print(json.dumps(found, indent=1))
        return
    print(f"{found['rows']} rows addressed, {found['owned_rows']} owned by the text "
          "(* = owned; reads = positions of the training split that read the row)")
    for p in found["positions"]:
        print(f"[{p['position']}] {p['token']!r}")
        for layer, heads in p["layers"].items():
            for h in heads:
                partners = ", ".join(f"{q['gram']!r} x{q['count']}" for q in h["partners"]) or "-"
                mark = "*" if h["owned"] else " "
                print(f"   {mark} layer {layer} head {h['head']} ({h['order']}-gram {h['gram']!r} x{h['gram_count']}): "
                      f"row {h['row']}, reads {h['reads']}, partners {partners}")


def _report(result: dict) -> None:
    b, a = result["before"], result["after"]
    print(f"edited {result['checkpoint']}: changed {result['changed']} rows, left {result['skipped']} alone -> "
          f"{result['out']}")
    from engram.memory.editing import count_reasons

    for kind, n in count_reasons(s["reason"] for s in result["log"]["skipped"]).items():
        print(f"  not touched: {n} rows ({kind})")
    print(f"  text loss     {b['text_loss']:.4f} -> {a['text_loss']:.4f} ({a['text_loss'] - b['text_loss']:+.4f})")
    print(f"  held-out loss {b['held_out_loss']:.4f} -> {a['held_out_loss']:.4f} "
          f"({a['held_out_loss'] - b['held_out_loss']:+.4f})")
    if result.get("overlay"):
        print(f"  overlay: {result['out']} ({result['overlay_bytes']:,} bytes of rows; apply it with: engram eval|"
              f"generate RUN --overlay {result['out']})")
    else:
        print(f"  edit log: {result['out']}/checkpoints/*/edit_log.json (replay it with: engram memory replay "
              f"{result['out']})")


def cmd_forget(args: argparse.Namespace) -> None:
    """Reset the rows a text owns; writes a new run with the edit log (the source is never changed)."""
    from engram.lifecycle import forget

    _report(forget(args.run, _texts(args), out=args.out, mode=args.mode, force=args.force,
                   max_count=args.max_count, max_shared=args.max_shared, index=args.index, overlay=args.overlay,
                   fallback=args.fall_back))


def cmd_write(args: argparse.Namespace) -> None:
    """Fine-tune only the rows a text owns on that text; writes a new run with the edit log."""
    from engram.lifecycle import write

    _report(write(args.run, _texts(args), out=args.out, steps=args.steps, lr=args.lr, force=args.force,
                  max_count=args.max_count, max_shared=args.max_shared, index=args.index, overlay=args.overlay,
                  fallback=args.fall_back))


def cmd_replay(args: argparse.Namespace) -> None:
    """Re-apply an edited run's log to its parent and check the result is the edited run, bit for bit."""
    from engram.lifecycle import replay

    r = replay(args.edited, on=args.on)
    print(f"replayed {r['rows']} rows of {r['edited']} on {r['parent']}: identical")


def cmd_overlay(args: argparse.Namespace) -> None:
    """Inspect, verify against a run, merge into a new run, or delete memory overlays."""
    from engram.lifecycle import overlays as ops

    if args.overlay_command == "show":
        for folder in args.overlays:
            print(json.dumps(ops.overlay_show(folder), indent=1))
    elif args.overlay_command == "verify":
        for folder in args.overlays:
            r = ops.overlay_verify(folder, args.run)
            print(f"{folder}: fits {r['checkpoint']} ({r['rows']} rows: layout, parent and base rows checked)")
    elif args.overlay_command == "merge":
        r = ops.overlay_merge(args.overlays, args.run, out=args.out, force=args.force)
        print(f"merged {r['overlays']} overlay(s), {r['changed']} rows, into {r['out']} (replay it with: engram "
              f"memory replay {r['out']})")
    else:
        for folder in args.overlays:
            print(f"dropped {ops.overlay_drop(folder)['dropped']}")


def _text_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", action="append", help="text to act on (repeatable)")
    p.add_argument("--text-file", type=existing_file, help="a file of texts, one per line")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=existing_dir, help="row index folder (default: RUN/memory_index)")
    p.add_argument("--max-count", type=nonneg_int, default=64,
                   help="n-grams seen more often than this in training are general language: left alone "
                   "(default 64)")
    p.add_argument("--max-shared", type=fraction, default=0.5,
                   help="a row is the text's when other frequent n-grams make at most this share of its training "
                   "reads (default 0.5)")


def add_commands(sub) -> None:
    mem = sub.add_parser("memory", help="locate, forget and write what the Engram tables hold",
                         description=__doc__)
    msub = mem.add_subparsers(dest="memory_command", required=True, parser_class=type(mem))
    p = msub.add_parser("index", help=cmd_index.__doc__, description=cmd_index.__doc__)
    p.add_argument("run", type=existing_dir)
    p.add_argument("--min-count", type=positive_int, default=2,
                   help="list an n-gram as a collision partner when it occurs at least this often (default 2)")
    p.set_defaults(func=cmd_index)
    p = msub.add_parser("locate", help=cmd_locate.__doc__, description=cmd_locate.__doc__)
    p.add_argument("run", type=existing_dir)
    p.add_argument("--text", required=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    _common(p)
    p.set_defaults(func=cmd_locate)
    for name, func in (("forget", cmd_forget), ("write", cmd_write)):
        p = msub.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.add_argument("run", type=existing_dir)
        _text_options(p)
        p.add_argument("--out", type=out_dir, required=True, help="the new run folder, or with --overlay the "
                       "overlay folder (new or empty, outside the run)")
        p.add_argument("--overlay", action="store_true", help="write only the changed rows, as an overlay folder "
                       "(apply it with engram eval|generate RUN --overlay DIR) instead of a whole new run")
        p.add_argument("--force", action="store_true", help="also change rows shared with other n-grams or common")
        p.add_argument("--fall-back", action="store_true", help="when the run's newest checkpoint is corrupt, edit "
                       "the newest good one (otherwise refused)")
        _common(p)
        if name == "forget":
            p.add_argument("--mode", choices=["zero", "mean"], default="zero",
                           help="zero the rows, or set them to the mean row their head's training read")
        else:
            p.add_argument("--steps", type=positive_int, default=50)
            p.add_argument("--lr", type=positive_float, default=0.05)
        p.set_defaults(func=func)
    p = msub.add_parser("overlay", help=cmd_overlay.__doc__, description=cmd_overlay.__doc__)
    osub = p.add_subparsers(dest="overlay_command", required=True, parser_class=type(mem))
    for name, help_ in (("show", "what each overlay holds"), ("verify", "check overlays fit --run"),
                        ("merge", "write --run with the overlays applied in order as a new run --out"),
                        ("drop", "delete overlay folders (only folders that are overlays)")):
        q = osub.add_parser(name, help=help_, description=help_)
        q.add_argument("overlays", type=existing_dir, nargs="+", metavar="OVERLAY")
        if name in ("verify", "merge"):
            q.add_argument("--run", type=existing_dir, required=True, help="the run the overlays apply to")
        if name == "merge":
            q.add_argument("--out", type=out_dir, required=True, help="the new run folder (must not exist)")
            q.add_argument("--force", action="store_true", help="merge even where base rows or the parent differ")
        q.set_defaults(func=cmd_overlay)
    p = msub.add_parser("replay", help=cmd_replay.__doc__, description=cmd_replay.__doc__)
    p.add_argument("edited", type=existing_dir, help="an edited run (from engram memory forget/write)")
    p.add_argument("--on", type=existing_dir, help="the run to replay on (default: the edited run's parent)")
    p.set_defaults(func=cmd_replay)
