"""The hash layout of transformers' Qwen4Exp n-gram memory (`Qwen4ExpTextNGramEmbedding`), as a
`HashLayout`, so our hasher, tables, analysis and serving tools read such models.

It differs from the demo's layout in how its numbers are made, not in the hash itself (XOR of
id x multiplier products, one remainder per head):
- multipliers from SplitMix64 seeded by (seed, the memory layer's index among memory layers);
- head sizes: the n-th prime at or after a common base, n counting heads over all memory layers;
- no tokenizer compression (raw ids), the "before start" id is EOS, and n-grams never reach
  back across an EOS (`reset_id`);
- its table is padded to a multiple of 128 rows (storage only: padding rows are never read).
"""

from __future__ import annotations

from typing import Sequence

from .layout import HashLayout, is_prime

_MASK64 = (1 << 64) - 1
_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_LAYER_STRIDE = 10007


def splitmix64(value: int) -> int:
    value = (value + _GAMMA) & _MASK64
    value = ((value ^ (value >> 30)) * _M1) & _MASK64
    value = ((value ^ (value >> 27)) * _M2) & _MASK64
    return (value ^ (value >> 31)) & _MASK64


def qwen4exp_multipliers(vocab_size: int, ngram_size: int, memory_index: int, seed: int) -> tuple[int, ...]:
    """N odd multipliers below (2^63 - 1) // vocab_size for the `memory_index`-th memory layer."""
    half = max(1, ((1 << 63) - 1) // max(vocab_size, 1) // 2)
    base = seed + _LAYER_STRIDE * memory_index
    return tuple(2 * (splitmix64((base + _GAMMA * (i + 1)) & _MASK64) % half) + 1 for i in range(ngram_size))


def qwen4exp_layout(*, vocab_size: int, layer_ids: Sequence[int], ngram_size: int, heads_per_ngram: int,
                    ngram_vocab_size_base: int, seed: int, eos_token_id: int,
                    row_multiple: int = 128) -> HashLayout:
    """The layout of a Qwen4Exp text model's memory layers `layer_ids` (its `ple_layer_ids`);
    `row_multiple` is its config's `make_ngram_vocab_size_divisible_by`."""
    heads = (ngram_size - 1) * heads_per_ngram
    primes, p = [], ngram_vocab_size_base - 1
    for _ in range(len(layer_ids) * heads):  # the next prime each time: head h of layer i is prime i*H + h + 1
        p += 1
        while not is_prime(p):
            p += 1
        primes.append(p)
    layers = sorted(layer_ids)
    return HashLayout(
        layer_ids=tuple(layers), max_ngram_size=ngram_size, n_head_per_ngram=heads_per_ngram,
        rows_per_head=(ngram_vocab_size_base,) * (ngram_size - 1), compressed_vocab_size=vocab_size,
        pad_id=eos_token_id, seed=seed, reset_id=eos_token_id, scheme="qwen4exp", row_multiple=row_multiple,
        multipliers={layer: qwen4exp_multipliers(vocab_size, ngram_size, i, seed) for i, layer in enumerate(layers)},
        primes={layer: tuple(primes[i * heads:(i + 1) * heads]) for i, layer in enumerate(layers)})
