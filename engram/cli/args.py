"""What every command shares: the one-line error, the parser, and checked argument types.

Each `type=` below turns a bad value into one line naming the option, the value and what it
needs (argparse adds "argument --NAME:"), so `engram` exits with code 2 before any work starts.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        raise UserError(f"{self.prog}: {message} (see --help)")


def _checked(parse, ok, need: str):
    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"needs {need}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"needs {need}, got {text!r}")
        return value

    check.__name__ = need  # argparse names the type in some messages
    return check


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


positive_int = _checked(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(_finite, lambda v: v > 0, "a number > 0")
nonneg_float = _checked(_finite, lambda v: v >= 0, "a number >= 0")
probability = _checked(_finite, lambda v: 0 < v <= 1, "a number in (0, 1]")
fraction = _checked(_finite, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_fraction = _checked(_finite, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def each(parse):
    """The type of one value of a list option (`nargs="+"`): a comma list is one clear error."""
    def check(text: str):
        if "," in text:
            raise argparse.ArgumentTypeError(f"takes its values as separate words (e.g. {text.replace(',', ' ')}), "
                                             f"not comma-separated; got {text!r}")
        return parse(text)

    check.__name__ = parse.__name__
    return check


def existing_file(text: str) -> str:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def existing_dir(text: str) -> str:
    path = Path(text)
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def out_dir(text: str) -> str:
    """A folder that may not exist yet (one to write into), but must not be a file."""
    if Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    return text


device_spec = _checked(str, lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                       "auto, cpu, cuda or cuda:N")
DTYPES = ["fp32", "bf16"]


def add_device_options(p: argparse.ArgumentParser) -> None:
    """--device and --dtype (train, eval, generate)."""
    p.add_argument("--device", type=device_spec,
                   help="auto (default: a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=DTYPES, help="compute precision: fp32 (default) or bf16 (autocast; the "
                   "weights stay float32)")
