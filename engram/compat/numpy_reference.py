"""The reference hashing algorithm, per head, in numpy, written from docs/paper.md step 3.

Independent of `engram.hashing` on purpose (its own prime test, its own loops): the tests
and benchmarks/bench_hash.py compare `NgramHasher` against it. Not used by the library.
"""

from __future__ import annotations

import numpy as np


def _is_prime_trial(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def numpy_layout(layer_ids, max_ngram_size, n_head_per_ngram, rows_per_head,
                 compressed_vocab_size, seed):
    """(multipliers {layer: int64[N]}, primes {layer: [[K] per order]}) as the reference makes them."""
    half_bound = max(1, (np.iinfo(np.int64).max // compressed_vocab_size) // 2)
    mults = {}
    for layer_id in layer_ids:
        g = np.random.default_rng(int(seed + 10007 * int(layer_id)))
        mults[layer_id] = g.integers(0, half_bound, size=(max_ngram_size,), dtype=np.int64) * 2 + 1
    seen, primes = set(), {}
    for layer_id in layer_ids:
        per_order = []
        for n in range(2, max_ngram_size + 1):
            start, heads = rows_per_head[n - 2] - 1, []
            for _ in range(n_head_per_ngram):
                c = start + 1
                while not (_is_prime_trial(c) and c not in seen):
                    c += 1
                seen.add(c)
                heads.append(c)
                start = c
            per_order.append(heads)
        primes[layer_id] = per_order
    return mults, primes


def numpy_hash_layer(ids, multipliers, primes_per_order, pad_id):
    """Rows [B, T, (N-1)*K] of one layer for compressed ids [B, T], one head at a time."""
    x = np.asarray(ids, dtype=np.int64)
    B, T = x.shape
    N = len(multipliers)
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]
                    for k in range(1, N)]
    out = []
    for n in range(2, N + 1):
        mix = shifts[0] * multipliers[0]
        for k in range(1, n):
            mix = np.bitwise_xor(mix, shifts[k] * multipliers[k])
        for p in primes_per_order[n - 2]:
            out.append(mix % int(p))
    return np.stack(out, axis=2)


def numpy_hash(ids, layer_ids, multipliers, primes, pad_id):
    return {l: numpy_hash_layer(ids, multipliers[l], primes[l], pad_id) for l in layer_ids}
