"""NgramHasher: compressed token ids -> per-table row ids for every Engram layer.

Shape legend: L Engram layers, B batch, T time, N max n-gram order, K heads per order,
H = (N-1)*K tables per layer, C = N-1 ids of left context.

The contract (docs/paper.md step 3), per layer and order n = 2..N:
    mix_n[t] = XOR_{k<n} (x[t-k] * multipliers[k])        (int64, never overflows)
    row[t, (n-2)*K + h] = mix_n[t] % primes[(n-2)*K + h]
with x[t-k] = pad_id before the sequence start. Everything is torch int64, so it runs on any
device; a fused float kernel (`kernel="compiled"`) gives the same integers faster on CPU.
`kernel="auto"` (the default) picks the fastest exact kernel per call (see `NgramHasher`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Sequence

import torch

from .layout import HashLayout

_LIMB = 21  # mix < 2^63 splits into three 21-bit limbs
_LIMB_MASK = (1 << _LIMB) - 1
# The float kernel computes y = a0 + a1*(2^21 mod p) + a2*(2^42 mod p) < 3 * 2^21 * p, which
# must stay below 2^53 to be exact in float64: p < 2^53 / (3 * 2^21).
MAX_PRIME_FOR_FLOAT_KERNEL = (1 << 53) // (3 << _LIMB)
# Below this many ids per call the compiled kernel gains nothing and would recompile for every
# new decode-step shape, so small calls (decoding) take the eager path; both are exact.
COMPILED_MIN_TOKENS = 8192


_log = logging.getLogger(__name__)


def _reset_windows(win_BTN: torch.Tensor, reset: tuple[int, int]) -> torch.Tensor:
    """Windows whose earlier ids do not reach back across a reset id: x[t-k] reads as pad when
    a reset id stands anywhere in x[t-k .. t-1] (x[t] itself may be the reset id)."""
    reset_id, pad_id = reset
    N = win_BTN.shape[-1]
    hit = (win_BTN[..., :N - 1] == reset_id).flip(-1).cummax(-1).values.flip(-1)  # a reset at or after column j
    return torch.cat([win_BTN[..., :N - 1].masked_fill(hit, pad_id), win_BTN[..., N - 1:]], dim=-1)


def _mix(ctx_BC_T: torch.Tensor, mults_LN: torch.Tensor, reset: tuple[int, int] | None = None,
         segments: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """XOR-mixed n-gram keys for orders 2..N: [B, C+T] ids -> [L, B, T, N-1] int64.

    One multiply for all layers and lags (a decode step is a handful of tiny ops, so their
    count, not their size, is the cost)."""
    L, N = mults_LN.shape
    B, T = ctx_BC_T.shape[0], ctx_BC_T.shape[1] - (N - 1)
    if T == 0:  # unfold needs at least one window
        return ctx_BC_T.new_empty(L, B, 0, N - 1)
    # window t of the context-padded ids is x[t-N+1 .. t]: x[t-k] sits in column N-1-k
    win_BTN = ctx_BC_T.unfold(1, N, 1)
    if reset is not None:
        win_BTN = _reset_windows(win_BTN, reset)
    if segments is not None:  # earlier ids of another segment (document) read as pad
        seg_BTN = segments[0].unfold(1, N, 1)
        win_BTN = win_BTN.masked_fill(seg_BTN != seg_BTN[..., N - 1:], segments[1])
    terms_LBTN = win_BTN.unsqueeze(0) * mults_LN.flip(-1).view(L, 1, 1, N)  # column N-1-k: x[t-k] * mult[k]
    mix_LBT = terms_LBTN[..., N - 1]
    mixes = []
    for k in range(1, N):
        mix_LBT = mix_LBT ^ terms_LBTN[..., N - 1 - k]
        mixes.append(mix_LBT)  # mix of order k+1
    return torch.stack(mixes, dim=-1)


def _rows_int(ctx_BC_T: torch.Tensor, mults_LN: torch.Tensor, primes_LNK: torch.Tensor,
              reset: tuple[int, int] | None = None, segments: tuple[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Reference-shaped kernel: one int64 remainder per head. -> [L, B, T, H]."""
    mix_LBTN = _mix(ctx_BC_T, mults_LN, reset, segments)
    L, _, _, n_orders = mix_LBTN.shape
    rows = mix_LBTN.unsqueeze(-1) % primes_LNK.view(L, 1, 1, n_orders, -1)
    return rows.flatten(-2)  # [L, B, T, (N-1), K] -> [L, B, T, H]


def _rows_float(
    ctx_BC_T: torch.Tensor, mults_LN: torch.Tensor, primes_LNK: torch.Tensor,
    limb1_LNK: torch.Tensor, limb2_LNK: torch.Tensor, inv_LNK: torch.Tensor, reset: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Same integers as `_rows_int` without integer division (meant to run compiled).

    mix = a0 + a1*2^21 + a2*2^42, so mix % p == (a0 + a1*c1 + a2*c2) % p with c_i = 2^(21i) % p.
    y = a0 + a1*c1 + a2*c2 is an integer below 2^53 (exact in float64); q = floor(y / p) via one
    multiply can be off by one, which the two corrections fix. All intermediates are exact.
    """
    mix_LBTN = _mix(ctx_BC_T, mults_LN, reset)
    L, _, _, n_orders = mix_LBTN.shape
    view = (L, 1, 1, n_orders, -1)
    m = mix_LBTN.unsqueeze(-1)
    p = primes_LNK.view(view).to(torch.float64)
    y = ((m & _LIMB_MASK).to(torch.float64)
         + ((m >> _LIMB) & _LIMB_MASK).to(torch.float64) * limb1_LNK.view(view)
         + (m >> (2 * _LIMB)).to(torch.float64) * limb2_LNK.view(view))
    r = y - torch.floor(y * inv_LNK.view(view)) * p
    r = torch.where(r < 0, r + p, r)
    r = torch.where(r >= p, r - p, r)
    return r.to(torch.int64).flatten(-2)


_compiled_rows_float = None
_compiled_failed: str | None = None  # why the compiled kernel cannot run here (auto falls back)
# Auto mode compiles one static-shape kernel per call shape. Training has one or two shapes;
# evaluation over prompts of many lengths would compile on every call (seconds each) and hit
# dynamo's recompile limit, so shapes beyond the first COMPILED_MAX_SHAPES hash eagerly.
COMPILED_MAX_SHAPES = 4
_compiled_shapes: set[tuple] = set()


def _get_compiled():
    global _compiled_rows_float
    if _compiled_rows_float is None:
        # Static shapes: inductor vectorizes them ~4x better than dynamic ones here; a data
        # pipeline's batches have one or two shapes, and small calls stay eager (see above).
        _compiled_rows_float = torch.compile(_rows_float, dynamic=False)
    return _compiled_rows_float


@functools.cache
def _cpu_compiler() -> str | None:
    """None when inductor finds a C++ compiler for CPU kernels, else why not (checked once)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
        return None
    except Exception as e:  # InvalidCxxCompiler, or an inductor without cpp_builder
        return f"no C++ compiler for torch.compile ({type(e).__name__})"


def _fall_back(reason: str) -> None:
    """Auto mode only: stop using the compiled kernel in this process, say so once."""
    global _compiled_failed
    if _compiled_failed is None:
        _compiled_failed = reason
        _log.warning("NgramHasher(kernel='auto'): %s; hashing with the exact eager int64 kernel "
                     "instead (same row ids, a few times slower on CPU). Install a C++ compiler (g++) "
                     "for the fused kernel, or pass kernel='eager' to choose it explicitly.", reason)


class NgramHasher:
    """Hash compressed ids of a batch into row ids for all Engram layers at once.

    `kernel="eager"` uses int64 remainders: exact everywhere, fast on GPUs.
    `kernel="compiled"` fuses an exact float64 formulation with `torch.compile` for batches of
    at least COMPILED_MIN_TOKENS ids (needs a C++ compiler on CPU; the first call of each new
    batch shape compiles for a few seconds): several times faster than eager on CPU. Both give
    identical integers; see benchmarks/bench_hash.py.
    `kernel="auto"` (default): the compiled kernel for big CPU batches where inductor finds a
    C++ compiler and the layout's primes allow it, the eager kernel otherwise (small calls such
    as decode steps, GPUs, and inside a `torch.compile`d model, where the eager ops are traced
    into the model's graph); a missing compiler is logged once, naming the fallback.
    """

    def __init__(
        self, *, layer_ids: Sequence[int], max_ngram_size: int, n_head_per_ngram: int,
        rows_per_head: Sequence[int], compressed_vocab_size: int, pad_id: int,
        seed: int = 0, vocab_fingerprint: str | None = None, kernel: str = "auto",
    ) -> None:
        layout = HashLayout.build(
            layer_ids=layer_ids, max_ngram_size=max_ngram_size, n_head_per_ngram=n_head_per_ngram,
            rows_per_head=rows_per_head, compressed_vocab_size=compressed_vocab_size,
            pad_id=pad_id, seed=seed, vocab_fingerprint=vocab_fingerprint,
        )
        self._init_from_layout(layout, kernel)

    @classmethod
    def from_layout(cls, layout: HashLayout, kernel: str = "auto") -> "NgramHasher":
        """A hasher that uses the saved numbers as they are (no random generator involved)."""
        self = cls.__new__(cls)
        self._init_from_layout(layout, kernel)
        return self

    @classmethod
    def from_config(cls, config: Any, vocab_fingerprint: str | None = None, kernel: str = "auto") -> "NgramHasher":
        return cls.from_layout(HashLayout.from_config(config, vocab_fingerprint), kernel)

    def _init_from_layout(self, layout: HashLayout, kernel: str) -> None:
        if kernel not in ("auto", "eager", "compiled"):
            raise ValueError(f"kernel must be 'auto', 'eager' or 'compiled', got {kernel!r}")
        biggest = max(max(p) for p in layout.primes.values())
        if kernel == "compiled" and biggest > MAX_PRIME_FOR_FLOAT_KERNEL:
            raise ValueError(
                f"kernel='compiled' is exact only for table sizes <= {MAX_PRIME_FOR_FLOAT_KERNEL}, "
                f"this layout has {biggest}; use kernel='eager'"
            )
        self.layout = layout
        self.kernel = kernel
        self._float_exact = biggest <= MAX_PRIME_FOR_FLOAT_KERNEL
        self.layer_ids = layout.layer_ids
        self.max_ngram_size = layout.max_ngram_size
        self.pad_id = layout.pad_id
        self.compressed_vocab_size = layout.compressed_vocab_size
        self.table_sizes = {l: list(layout.primes[l]) for l in layout.layer_ids}
        self.n_hash_heads = (layout.max_ngram_size - 1) * layout.n_head_per_ngram
        self._consts: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Multipliers, primes and the float kernel's constants on `device` (cached, except
        while torch.compile or torch.export traces: those would be its fake tensors, and every
        later eager call would compute on them)."""
        if device not in self._consts or torch.compiler.is_compiling():
            lay = self.layout
            mults = torch.tensor([lay.multipliers[l] for l in self.layer_ids], dtype=torch.int64)
            primes = torch.tensor([lay.primes[l] for l in self.layer_ids], dtype=torch.int64)
            consts = [mults, primes]
            if self._float_exact:
                consts += [
                    torch.remainder(torch.full_like(primes, 1 << _LIMB), primes).double(),
                    torch.remainder(torch.full_like(primes, 1 << (2 * _LIMB)), primes).double(),
                    1.0 / primes.double(),
                ]
            consts = tuple(c.to(device) for c in consts)
            if torch.compiler.is_compiling():
                return consts
            self._consts[device] = consts
        return self._consts[device]

    def _check_ids(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        ids = torch.as_tensor(ids)
        if ids.dim() != 2:
            raise ValueError(f"{name} must be [batch, time] compressed ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.compressed_vocab_size:
                raise ValueError(
                    f"{name} hold values in [{lo}, {hi}] but the compressed vocabulary has "
                    f"{self.compressed_vocab_size} ids (0..{self.compressed_vocab_size - 1}); pass ids through CompressedTokenizer first "
                    "(raw tokenizer ids are not compressed ids)"
                )
        return ids.to(torch.int64)

    def kernel_for(self, ctx: torch.Tensor) -> str:
        """The kernel a call on `ctx` ([B, N-1+T] ids) runs: "compiled" or "eager"."""
        if self.kernel == "eager" or ctx.numel() < COMPILED_MIN_TOKENS or torch.compiler.is_compiling():
            return "eager"
        if self.kernel == "compiled":
            return "compiled"
        if not self._float_exact or ctx.device.type != "cpu" or _compiled_failed is not None:
            return "eager"
        if self._shape_key(ctx) not in _compiled_shapes and len(_compiled_shapes) >= COMPILED_MAX_SHAPES:
            return "eager"  # a new shape after the budget: eager costs less than another compile
        reason = _cpu_compiler()
        if reason is not None:
            _fall_back(reason)
            return "eager"
        return "compiled"

    def _shape_key(self, ctx: torch.Tensor) -> tuple:
        """What the compiled kernel specializes on: the call shape, the layout's shape, the reset."""
        return tuple(ctx.shape), len(self.layer_ids), self.max_ngram_size, self.n_hash_heads, self.layout.reset_id

    def _rows(self, ctx: torch.Tensor, segments: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        consts = self._constants(ctx.device)
        kernel = "eager" if segments is not None else self.kernel_for(ctx)
        lay = self.layout
        reset = None if lay.reset_id is None else (lay.reset_id, lay.pad_id)
        rows_LBTH = None
        if kernel == "compiled":
            _compiled_shapes.add(self._shape_key(ctx))
            try:
                rows_LBTH = _get_compiled()(ctx, *consts, reset)
            except Exception as e:  # auto: a compiler that is present but fails to build
                if self.kernel != "auto":
                    raise
                _fall_back(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        if rows_LBTH is None:
            rows_LBTH = _rows_int(ctx, *consts[:2], reset, None if segments is None else (segments, self.pad_id))
        return dict(zip(self.layer_ids, rows_LBTH.unbind(0)))

    def initial_history(self, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The N-1 ids 'before the start' of a sequence: all pad, [B, N-1]."""
        return torch.full((batch_size, self.max_ngram_size - 1), self.pad_id, dtype=torch.int64, device=device)

    def hash(self, ids_BT: torch.Tensor, *, check: bool = True,
             segment_ids: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{layer_id: rows [B, T, H]} for whole sequences (padded on the left with pad_id).

        `segment_ids` [B, T] (packed documents, e.g. from a data pipeline): n-grams do not reach
        back into another segment; earlier ids of another segment read as pad_id. (For
        decoding, and for resets at a token id, use the layout's `reset_id`.)
        `check=False` skips the value range check (a host sync on a GPU): for ids that are
        compressed ids by construction, such as `EngramLM`'s own."""
        ids = self._check_ids(ids_BT, "ids") if check else ids_BT
        ctx = torch.cat([self.initial_history(ids.shape[0], ids.device), ids], dim=1)
        segs = None
        if segment_ids is not None:
            if segment_ids.shape != ids.shape:
                raise ValueError(f"segment_ids must have the ids' shape {tuple(ids.shape)}, got "
                                 f"{tuple(segment_ids.shape)}")
            segs = torch.cat([segment_ids[:, :1].expand(-1, self.max_ngram_size - 1),
                              segment_ids], dim=1).to(ids.device)  # the history: pad already
        return self._rows(ctx, segs)

    def hash_step(
        self, history_BC: torch.Tensor, ids_BS: torch.Tensor, *, check: bool = True
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Rows for S new ids that continue sequences whose last N-1 ids are `history_BC`.

        Returns ({layer_id: rows [B, S, H]}, new history [B, N-1]); the rows equal those of
        `hash` on the whole sequence at these positions. Start from `initial_history(B)`.
        `check=False`: as in `hash`.
        """
        ids = self._check_ids(ids_BS, "ids") if check else ids_BS
        hist = self._check_ids(history_BC, "history") if check else history_BC
        if hist.shape != (ids.shape[0], self.max_ngram_size - 1):
            raise ValueError(
                f"history must be [batch={ids.shape[0]}, N-1={self.max_ngram_size - 1}], got "
                f"{tuple(hist.shape)}; start a sequence with initial_history(batch_size)"
            )
        ctx = torch.cat([hist if hist.device == ids.device else hist.to(ids.device), ids], dim=1)
        return self._rows(ctx), ctx[:, ctx.shape[1] - (self.max_ngram_size - 1):]

    def __repr__(self) -> str:
        lay = self.layout
        return (f"NgramHasher(layers={list(lay.layer_ids)}, N={lay.max_ngram_size}, "
                f"K={lay.n_head_per_ngram}, V'={lay.compressed_vocab_size}, kernel={self.kernel!r})")
