"""HashLayout: the numbers that address the tables (multipliers, primes), saved with a model.

The reference contract (docs/paper.md step 3) draws multipliers from numpy's default generator,
which numpy does not promise to keep stable across releases. So the layout is computed once,
saved as JSON beside the weights, and on load the saved numbers are used as they are: the
hashes never depend on the numpy installed later.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import rename_old_field
from ..durable import json_sha256

LAYOUT_VERSION = 1
_LAYER_SEED_STRIDE = 10007  # seed + 10007 * layer_id, as in the reference
_INT64_MAX = int(np.iinfo(np.int64).max)
# Deterministic Miller-Rabin: these bases decide primality for every n < 3.3e24.
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)


def is_prime(n: int) -> bool:
    """Exact primality for any n < 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_unused_prime(start: int, used: set[int]) -> int:
    """Smallest prime > start that is not in `used` (the reference's search)."""
    candidate = start + 1
    while not (is_prime(candidate) and candidate not in used):
        candidate += 1
    return candidate


def reference_multipliers(
    seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int
) -> list[int]:
    """Odd multipliers of one layer, drawn exactly as the reference draws them."""
    half_bound = max(1, (_INT64_MAX // compressed_vocab_size) // 2)
    rng = np.random.default_rng(seed + _LAYER_SEED_STRIDE * layer_id)
    draws = rng.integers(0, half_bound, size=max_ngram_size, dtype=np.int64)
    return [int(2 * r + 1) for r in draws]


def reference_primes(
    layer_ids: Sequence[int], max_ngram_size: int, n_head_per_ngram: int,
    rows_per_head: Sequence[int],
) -> dict[int, list[int]]:
    """Table sizes per layer in head order (order 2 heads, then order 3 heads, ...)."""
    used: set[int] = set()
    out: dict[int, list[int]] = {}
    for layer_id in layer_ids:
        sizes: list[int] = []
        for n in range(2, max_ngram_size + 1):
            start = rows_per_head[n - 2] - 1
            for _ in range(n_head_per_ngram):
                start = next_unused_prime(start, used)
                used.add(start)
                sizes.append(start)
        out[layer_id] = sizes
    return out


def vocab_fingerprint(lookup_table: np.ndarray) -> str:
    """sha256 of the compression table (int64, little endian): names the compressed id space."""
    data = np.ascontiguousarray(lookup_table, dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


def _first_difference(mine: Any, theirs: Any) -> str:
    """Where two values first differ: per layer and index for the multiplier and prime tables
    (long lists whose printed prefixes look alike), else both values whole."""
    if isinstance(mine, dict) and isinstance(theirs, dict):
        if set(mine) != set(theirs):
            return f"layout has layers {sorted(mine)}, other has {sorted(theirs)}"
        for key in sorted(mine):
            if tuple(mine[key]) != tuple(theirs[key]):
                return f"layer {key}: " + _first_difference(tuple(mine[key]), tuple(theirs[key]))
    if isinstance(mine, tuple) and isinstance(theirs, tuple) and len(mine) == len(theirs):
        i = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        return f"first differs at index {i}: layout has {mine[i]!r}, other has {theirs[i]!r}"
    return f"layout has {mine!r}, other has {theirs!r}"


@dataclass(frozen=True, kw_only=True)
class HashLayout:
    """Everything needed to turn compressed ids into row ids, with no random generator.

    `multipliers[layer_id]` has N odd int64 values; `primes[layer_id]` has (N-1)*K table
    sizes in head order, each the next unused prime above the order's `rows_per_head`. `vocab_fingerprint` names the compressed vocabulary the ids come
    from (None when the ids were not produced by a `CompressedTokenizer`).
    """

    layer_ids: tuple[int, ...]
    max_ngram_size: int
    n_head_per_ngram: int
    rows_per_head: tuple[int, ...]
    compressed_vocab_size: int
    pad_id: int
    seed: int
    multipliers: dict[int, tuple[int, ...]]
    primes: dict[int, tuple[int, ...]]
    vocab_fingerprint: str | None = None
    # n-grams do not reach across this (compressed) id: earlier ids read as pad_id (document
    # boundaries; transformers' Qwen4Exp resets at EOS). None: n-grams run across everything.
    reset_id: int | None = None
    scheme: str = "reference"  # how multipliers and primes were made: "reference" (the demo's) or "qwen4exp"
    # each layer's table (its heads back to back) is stored padded to a multiple of this many rows
    # (Qwen4Exp: 128). Storage only: padding rows are never addressed, so row ids do not change.
    row_multiple: int = 1
    version: int = field(default=LAYOUT_VERSION)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        object.__setattr__(self, "rows_per_head", tuple(int(v) for v in self.rows_per_head))
        object.__setattr__(self, "multipliers", {int(k): tuple(int(x) for x in v) for k, v in self.multipliers.items()})
        object.__setattr__(self, "primes", {int(k): tuple(int(x) for x in v) for k, v in self.primes.items()})
        self._validate()

    # -- construction --
    @classmethod
    def build(
        cls, *, layer_ids: Sequence[int], max_ngram_size: int, n_head_per_ngram: int,
        rows_per_head: Sequence[int], compressed_vocab_size: int, pad_id: int,
        seed: int = 0, vocab_fingerprint: str | None = None, reset_id: int | None = None,
    ) -> "HashLayout":
        """Compute a layout with the reference algorithm (numpy's generator, prime search)."""
        if len(rows_per_head) != max_ngram_size - 1:
            raise ValueError(
                f"rows_per_head needs {max_ngram_size - 1} entries (orders 2..{max_ngram_size}), "
                f"got {list(rows_per_head)}"
            )
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size must be >= 1, got {compressed_vocab_size}")
        mults = {
            int(l): tuple(reference_multipliers(seed, int(l), max_ngram_size, compressed_vocab_size))
            for l in layer_ids
        }
        primes = reference_primes(layer_ids, max_ngram_size, n_head_per_ngram, rows_per_head)
        return cls(
            layer_ids=tuple(layer_ids), max_ngram_size=max_ngram_size,
            n_head_per_ngram=n_head_per_ngram, rows_per_head=tuple(rows_per_head),
            compressed_vocab_size=compressed_vocab_size, pad_id=pad_id, seed=seed,
            multipliers=mults, primes={k: tuple(v) for k, v in primes.items()},
            vocab_fingerprint=vocab_fingerprint, reset_id=reset_id,
        )

    @classmethod
    def from_config(cls, config: Any, vocab_fingerprint: str | None = None) -> "HashLayout":
        """Layout for an `EngramConfig` (or anything with the same hashing fields)."""
        return cls.build(
            layer_ids=config.layer_ids, max_ngram_size=config.max_ngram_size,
            n_head_per_ngram=config.n_head_per_ngram,
            rows_per_head=config.rows_per_head,
            compressed_vocab_size=config.compressed_vocab_size, pad_id=config.pad_id,
            seed=config.seed, vocab_fingerprint=vocab_fingerprint, reset_id=getattr(config, "reset_id", None),
        )

    # -- checks --
    def _validate(self) -> None:
        n, k = self.max_ngram_size, self.n_head_per_ngram
        problems = []
        if set(self.multipliers) != set(self.layer_ids) or set(self.primes) != set(self.layer_ids):
            problems.append(
                f"multipliers/primes are given for layers {sorted(self.multipliers)}/"
                f"{sorted(self.primes)} but layer_ids is {list(self.layer_ids)}"
            )
        if self.row_multiple < 1:
            problems.append(f"row_multiple must be >= 1, got {self.row_multiple}")
        if not 0 <= self.pad_id < self.compressed_vocab_size:
            problems.append(f"pad_id {self.pad_id} is outside [0, {self.compressed_vocab_size})")
        if self.reset_id is not None and not 0 <= self.reset_id < self.compressed_vocab_size:
            problems.append(f"reset_id {self.reset_id} is outside [0, {self.compressed_vocab_size})")
        bound = _INT64_MAX // self.compressed_vocab_size
        seen: set[int] = set()
        for layer_id in self.layer_ids:
            mults = self.multipliers.get(layer_id, ())
            if len(mults) != n or any(m % 2 == 0 or not 0 < m <= bound for m in mults):
                problems.append(
                    f"layer {layer_id}: need {n} odd multipliers in (0, {bound}] so that "
                    f"id * multiplier cannot overflow int64, got {list(mults)}"
                )
            primes = self.primes.get(layer_id, ())
            if len(primes) != (n - 1) * k:
                problems.append(f"layer {layer_id}: need {(n - 1) * k} table sizes, got {len(primes)}")
            for p in primes:
                if p in seen or not is_prime(p):
                    problems.append(f"layer {layer_id}: table size {p} is not a fresh prime")
                seen.add(p)
        if problems:
            raise ValueError("invalid hash layout: " + "; ".join(problems))

    def stored_rows(self, layer_id: int) -> int:
        """Rows of the layer's stored table: its table sizes summed, padded to `row_multiple`."""
        rows = sum(self.primes[layer_id])
        return -(-rows // self.row_multiple) * self.row_multiple

    def mismatches(self, other: "HashLayout | Any") -> list[str]:
        """Field-by-field differences from another layout or from a config's hashing fields."""
        names = ["layer_ids", "max_ngram_size", "n_head_per_ngram", "rows_per_head",
                 "compressed_vocab_size", "pad_id", "seed", "reset_id"]
        if isinstance(other, HashLayout):
            names += ["multipliers", "primes"]
            if self.vocab_fingerprint and other.vocab_fingerprint:
                names.append("vocab_fingerprint")
        out = []
        for name in names:
            mine, theirs = getattr(self, name), getattr(other, name, None)
            if isinstance(theirs, list):
                theirs = tuple(theirs)
            if mine != theirs:
                out.append(f"{name}: {_first_difference(mine, theirs)}")
        return out

    def check_matches(self, other: "HashLayout | Any", what: str = "the model's config") -> None:
        """Raise a ValueError naming every differing field (hash layout mismatch)."""
        diffs = self.mismatches(other)
        if diffs:
            raise ValueError(
                f"hash layout mismatch with {what}: " + "; ".join(diffs)
                + ". The rows this layout addresses are not the rows the weights were trained "
                "with; load the hash_layout.json saved with those weights, or rebuild the "
                "layout from the same config and tokenizer."
            )

    def check_vocab(self, compressed_tokenizer: Any) -> None:
        """Raise if the ids will come from another compressed vocabulary than this layout's."""
        theirs = compressed_tokenizer.fingerprint
        if len(compressed_tokenizer) != self.compressed_vocab_size or (
                self.vocab_fingerprint is not None and theirs != self.vocab_fingerprint):
            raise ValueError(
                f"hash layout mismatch: the layout was built for a compressed vocabulary of "
                f"{self.compressed_vocab_size} ids (fingerprint {str(self.vocab_fingerprint)[:12]}), this "
                f"tokenizer gives {len(compressed_tokenizer)} ids (fingerprint {theirs[:12]}); use the "
                "tokenizer the model was trained with"
            )

    # -- JSON --
    def to_dict(self) -> dict[str, Any]:
        """Every field, and `fields_sha256` over them: `from_dict` refuses a layout whose fields
        (the multipliers and primes included, which no config can check) were changed since."""
        out = self._fields()
        out["fields_sha256"] = json_sha256(out)
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "version": self.version, "layer_ids": list(self.layer_ids),
            "max_ngram_size": self.max_ngram_size, "n_head_per_ngram": self.n_head_per_ngram,
            "rows_per_head": list(self.rows_per_head),
            "compressed_vocab_size": self.compressed_vocab_size, "pad_id": self.pad_id,
            "seed": self.seed, "vocab_fingerprint": self.vocab_fingerprint, "reset_id": self.reset_id,
            "scheme": self.scheme, "row_multiple": self.row_multiple,
            # JSON keys are strings; ints up to 2^63 are exact in Python's json.
            "multipliers": {str(k): list(v) for k, v in self.multipliers.items()},
            "primes": {str(k): list(v) for k, v in self.primes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HashLayout":
        version = data.get("version")
        if version != LAYOUT_VERSION:
            raise ValueError(
                f"hash layout version {version!r} is not supported (this engram-torch reads "
                f"version {LAYOUT_VERSION}); upgrade engram-torch or re-export the layout"
            )
        data = dict(data)
        stated = data.pop("fields_sha256", None)  # layouts saved before it existed have none
        checked = dict(data)
        rename_old_field(data, "vocab_size_per_ngram", "rows_per_head", "hash layout ")  # saved before the rename
        try:
            layout = cls(**data)  # each field's own checks first: they say what is wrong
        except TypeError as e:
            raise ValueError(f"hash layout JSON has missing or unknown fields: {e}") from None
        if stated is not None and stated != json_sha256(checked):
            raise ValueError("hash layout fields were changed after it was saved (they no longer match its "
                             "fields_sha256; a changed multiplier or prime addresses other rows than the weights "
                             "were trained with): restore the layout saved with the weights")
        return layout

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Any = None) -> "HashLayout":
        """Read a saved layout; with `expect` (a config or layout), fail unless it matches."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"hash layout file {path} is not valid JSON ({e}); it may be truncated") from None
        layout = cls.from_dict(data)
        if expect is not None:
            layout.check_matches(expect, f"{path}")
        return layout
