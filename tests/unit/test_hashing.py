"""NgramHasher against the independent per-head numpy reference (exact int64 equality)."""

import json

import numpy as np
import pytest
import sympy
import torch

from engram import HashLayout, NgramHasher
from engram.compat.numpy_reference import numpy_hash, numpy_layout


def random_config(rng):
    n = int(rng.integers(2, 5))  # N in 2..4
    n_layers = int(rng.integers(1, 4))
    return dict(
        layer_ids=[int(x) for x in rng.choice(40, size=n_layers, replace=False)],
        max_ngram_size=n,
        n_head_per_ngram=int(rng.integers(1, 9)),
        rows_per_head=[int(rng.choice([rng.integers(2, 5000), rng.integers(5000, 10**7)]))
                       for _ in range(n - 1)],
        compressed_vocab_size=int(rng.choice([2, 50, 1000, 98627, 10**7])),
        seed=int(rng.integers(0, 2**31)),
    )


def check_against_reference(cfg, ids, kernel="eager"):
    pad = int(cfg["pad_id"])
    hasher = NgramHasher(**cfg, kernel=kernel)
    mults, primes = numpy_layout(cfg["layer_ids"], cfg["max_ngram_size"], cfg["n_head_per_ngram"],
                                 cfg["rows_per_head"], cfg["compressed_vocab_size"], cfg["seed"])
    for l in cfg["layer_ids"]:
        assert list(hasher.layout.multipliers[l]) == mults[l].tolist()
        assert hasher.table_sizes[l] == [p for order in primes[l] for p in order]
    expected = numpy_hash(ids, cfg["layer_ids"], mults, primes, pad)
    got = hasher.hash(torch.from_numpy(ids))
    assert list(got) == list(cfg["layer_ids"])
    for l in cfg["layer_ids"]:
        assert got[l].dtype == torch.int64
        assert got[l].shape == expected[l].shape
        diff = int((got[l].numpy() != expected[l]).sum())
        assert diff == 0, f"layer {l}: {diff} rows differ from the reference ({cfg})"
    return hasher


def test_many_random_configs_match_reference_exactly(rng):
    for _ in range(60):
        cfg = random_config(rng)
        v = cfg["compressed_vocab_size"]
        cfg["pad_id"] = int(rng.integers(0, v))
        B, T = int(rng.integers(1, 4)), int(rng.integers(1, 40))
        ids = rng.integers(0, v, size=(B, T), dtype=np.int64)
        check_against_reference(cfg, ids)


def test_demo_config_matches_reference_with_extreme_ids(rng):
    v = 98627  # DeepSeek-V3's compressed vocabulary
    cfg = dict(layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8,
               rows_per_head=[646400, 646400], compressed_vocab_size=v, pad_id=2, seed=0)
    ids = rng.integers(0, v, size=(3, 257), dtype=np.int64)
    ids[0, :50] = v - 1  # the largest products the contract allows
    ids[1, :50] = 0
    hasher = check_against_reference(cfg, ids)
    # The demo's table sizes: the first primes above 646399, no prime used twice.
    sizes = hasher.table_sizes[1] + hasher.table_sizes[15]
    assert sizes[0] == int(sympy.nextprime(646399))
    assert all(sympy.isprime(p) for p in sizes) and len(set(sizes)) == 32
    assert sizes == sorted(sizes)


def test_primes_are_fresh_across_layers_and_orders():
    h = NgramHasher(layer_ids=[3, 0], max_ngram_size=4, n_head_per_ngram=3,
                    rows_per_head=[10, 10, 20], compressed_vocab_size=100, pad_id=0)
    # layer 3 first (layer_ids order), each order restarts its search at vocab-1 but skips used primes
    assert h.table_sizes[3] == [11, 13, 17, 19, 23, 29, 31, 37, 41]
    assert h.table_sizes[0] == [43, 47, 53, 59, 61, 67, 71, 73, 79]


def test_incremental_equals_full_for_any_chunking(rng):
    v = 5000
    hasher = NgramHasher(layer_ids=[0, 2], max_ngram_size=4, n_head_per_ngram=3,
                         rows_per_head=[997, 1500, 2000], compressed_vocab_size=v, pad_id=7, seed=3)
    ids = torch.from_numpy(rng.integers(0, v, size=(3, 23), dtype=np.int64))
    full = hasher.hash(ids)
    for _ in range(5):
        history, t, pieces = hasher.initial_history(3), 0, {0: [], 2: []}
        while t < ids.shape[1]:
            s = int(rng.integers(1, 6))
            rows, history = hasher.hash_step(history, ids[:, t:t + s])
            for l in pieces:
                pieces[l].append(rows[l])
            t += s
        for l in pieces:
            assert torch.equal(torch.cat(pieces[l], dim=1), full[l])
        assert torch.equal(history, ids[:, -3:])


def test_history_shorter_than_context_is_an_error():
    h = NgramHasher(layer_ids=[0], max_ngram_size=3, n_head_per_ngram=2, rows_per_head=[50, 50],
                    compressed_vocab_size=10, pad_id=0)
    with pytest.raises(ValueError, match="history must be"):
        h.hash_step(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_layout_json_round_trip_needs_no_generator(tmp_path, rng, monkeypatch):
    v = 1234
    cfg = dict(layer_ids=[2, 5], max_ngram_size=3, n_head_per_ngram=4, rows_per_head=[300, 400],
               compressed_vocab_size=v, pad_id=1, seed=11)
    hasher = NgramHasher(**cfg)
    hasher.layout.save(tmp_path / "hash_layout.json")
    ids = torch.from_numpy(rng.integers(0, v, size=(2, 31), dtype=np.int64))
    expected = hasher.hash(ids)

    def no_generator(*a, **k):
        raise AssertionError("loading a layout must not draw from numpy's generator")

    monkeypatch.setattr(np.random, "default_rng", no_generator)
    loaded = HashLayout.load(tmp_path / "hash_layout.json")
    assert loaded == hasher.layout
    again = NgramHasher.from_layout(loaded).hash(ids)
    for l in expected:
        assert torch.equal(again[l], expected[l])
    # multipliers near 2^63 survive JSON exactly
    raw = json.loads((tmp_path / "hash_layout.json").read_text())
    assert raw["multipliers"]["2"] == list(hasher.layout.multipliers[2])


def test_mismatched_layout_is_a_clear_error(tmp_path):
    from engram import EngramConfig

    layout = HashLayout.build(layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2,
                              rows_per_head=[100, 100], compressed_vocab_size=500, pad_id=0)
    cfg = EngramConfig(compressed_vocab_size=500, pad_id=0, layer_ids=(1,), rows_per_head=(100, 120),
                       n_head_per_ngram=2, n_embed_per_ngram=8)
    with pytest.raises(ValueError, match=r"hash layout mismatch.*rows_per_head"):
        layout.check_matches(cfg)
    path = tmp_path / "hash_layout.json"
    layout.save(path)
    with pytest.raises(ValueError, match="hash layout mismatch with .*hash_layout.json"):
        HashLayout.load(path, expect=cfg)
    other = HashLayout.build(layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2,
                             rows_per_head=[100, 100], compressed_vocab_size=500, pad_id=0, seed=1)
    with pytest.raises(ValueError, match=r"seed.*multipliers: layer 1: first differs at index 0"):
        layout.check_matches(other, "the checkpoint")
    # one prime changed deep in the list: the message points at it, not at two equal-looking prefixes
    data = layout.to_dict()
    data["primes"]["1"][3] += 2
    while not all(data["primes"]["1"][3] % d for d in range(2, int(data["primes"]["1"][3] ** 0.5) + 1)):
        data["primes"]["1"][3] += 2
    with pytest.raises(ValueError, match="fields were changed after it was saved"):  # its checksum
        HashLayout.from_dict(data)
    del data["fields_sha256"]  # a layout saved before the checksum: the comparison still names the prime
    with pytest.raises(ValueError, match=r"primes: layer 1: first differs at index 3: layout has \d+, other has"):
        layout.check_matches(HashLayout.from_dict(data))
    data = layout.to_dict()
    data["multipliers"]["1"][0] += 2  # what no config can check: only the checksum catches it
    with pytest.raises(ValueError, match="fields were changed after it was saved"):
        HashLayout.from_dict(data)


def test_layout_checks_the_tokenizer_fingerprint():
    from engram import CompressedTokenizer

    ct = CompressedTokenizer(np.array([0, 1, 1, 2, 3]))
    layout = HashLayout.build(layer_ids=[0], max_ngram_size=2, n_head_per_ngram=1, rows_per_head=[10],
                              compressed_vocab_size=4, pad_id=0, vocab_fingerprint=ct.fingerprint)
    layout.check_vocab(ct)
    with pytest.raises(ValueError, match="compressed vocabulary of 4 ids"):
        layout.check_vocab(CompressedTokenizer(np.array([0, 1, 2, 3, 1])))  # same size, other map


def test_corrupt_layout_is_rejected(tmp_path):
    layout = HashLayout.build(layer_ids=[0], max_ngram_size=2, n_head_per_ngram=2,
                              rows_per_head=[100], compressed_vocab_size=50, pad_id=0)
    data = layout.to_dict()
    data["primes"]["0"][1] = 104  # not a prime
    with pytest.raises(ValueError, match="not a fresh prime"):
        HashLayout.from_dict(data)
    data = layout.to_dict()
    data["multipliers"]["0"][0] += 1  # even multiplier
    with pytest.raises(ValueError, match="odd multipliers"):
        HashLayout.from_dict(data)
    (tmp_path / "l.json").write_text(json.dumps(layout.to_dict())[:-20])
    with pytest.raises(ValueError, match="truncated"):
        HashLayout.load(tmp_path / "l.json")
    with pytest.raises(ValueError, match="version"):
        HashLayout.from_dict({**layout.to_dict(), "version": 99})


def test_bad_ids_are_clear_errors():
    h = NgramHasher(layer_ids=[0], max_ngram_size=3, n_head_per_ngram=2, rows_per_head=[50, 50],
                    compressed_vocab_size=10, pad_id=0)
    with pytest.raises(ValueError, match=r"values in \[1, 10\].*compressed vocabulary has 10"):
        h.hash(torch.tensor([[1, 2, 10]]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        h.hash(torch.tensor([[1, 2, -1]]))
    with pytest.raises(ValueError, match="batch, time"):
        h.hash(torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        h.hash(torch.tensor([[1.0, 2.0]]))


def test_empty_sequence_gives_empty_rows():
    h = NgramHasher(layer_ids=[0], max_ngram_size=3, n_head_per_ngram=2, rows_per_head=[50, 50],
                    compressed_vocab_size=10, pad_id=0)
    assert h.hash(torch.zeros(2, 0, dtype=torch.long))[0].shape == (2, 0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):
    h = NgramHasher(layer_ids=[1, 15], max_ngram_size=3, n_head_per_ngram=8, rows_per_head=[646400] * 2,
                    compressed_vocab_size=98627, pad_id=2)
    ids = torch.from_numpy(rng.integers(0, 98627, size=(4, 512), dtype=np.int64))
    cpu, gpu = h.hash(ids), h.hash(ids.cuda())
    for l in cpu:
        assert gpu[l].is_cuda and torch.equal(gpu[l].cpu(), cpu[l])


def test_float_kernel_is_exact_eagerly_up_to_its_bound(rng):
    """The compiled kernel's math, run eagerly: exact on adversarial mixes and the largest primes."""
    from engram.hashing.ngram import MAX_PRIME_FOR_FLOAT_KERNEL, _rows_float, _rows_int

    big = int(sympy.prevprime(MAX_PRIME_FOR_FLOAT_KERNEL))
    primes = torch.tensor([[2, 3, big, int(sympy.prevprime(big)), 646411, 7_239_693]], dtype=torch.int64)
    for v in (2, 98627, 10**6):
        bound = (2**63 - 1) // v
        mults = torch.tensor([[bound if bound % 2 else bound - 1, 1, int(rng.integers(0, bound // 2)) * 2 + 1]])
        ctx = torch.from_numpy(rng.integers(0, v, size=(4, 300), dtype=np.int64))
        ctx[0] = v - 1
        p = primes.view(1, 2, 3)
        consts = (torch.remainder(torch.full_like(p, 1 << 21), p).double(),
                  torch.remainder(torch.full_like(p, 1 << 42), p).double(), 1.0 / p.double())
        assert torch.equal(_rows_float(ctx, mults, p, *consts), _rows_int(ctx, mults, p))


@pytest.mark.slow
def test_compiled_kernel_matches_reference(rng, monkeypatch):
    monkeypatch.setattr("engram.hashing.ngram.COMPILED_MIN_TOKENS", 0)  # compile even small batches
    for _ in range(5):
        cfg = random_config(rng)
        cfg["pad_id"] = 0
        ids = rng.integers(0, cfg["compressed_vocab_size"], size=(2, 64), dtype=np.int64)
        check_against_reference(cfg, ids, kernel="compiled")


# ---------------------------------------------------------------- kernel="auto"
def demo_hasher(kernel="auto", **kw):
    cfg = dict(layer_ids=[1, 4], max_ngram_size=3, n_head_per_ngram=4, rows_per_head=[5003, 5003],
               compressed_vocab_size=1000, pad_id=0, seed=1)
    cfg.update(kw)
    return NgramHasher(**cfg, kernel=kernel)


def test_auto_picks_compiled_only_for_big_cpu_calls_with_a_compiler(monkeypatch):
    import engram.hashing.ngram as ngram

    monkeypatch.setattr(ngram, "_compiled_failed", None)
    monkeypatch.setattr(ngram, "_compiled_shapes", set())
    monkeypatch.setattr(ngram, "_cpu_compiler", lambda: None)  # a compiler is present
    h = demo_hasher()
    assert h.kernel == "auto" and NgramHasher.from_layout(h.layout).kernel == "auto"
    big = torch.zeros(4, ngram.COMPILED_MIN_TOKENS // 4 + 2, dtype=torch.long)
    small = torch.zeros(4, 3, dtype=torch.long)  # a decode step
    assert h.kernel_for(big) == "compiled" and h.kernel_for(small) == "eager"
    assert demo_hasher("eager").kernel_for(big) == "eager"
    assert demo_hasher("compiled").kernel_for(big) == "compiled"
    assert h.kernel_for(big.to("meta")) == "eager"  # not a CPU tensor: the int64 kernel
    # primes past the float kernel's exact range: auto stays eager, "compiled" refuses
    huge = [ngram.MAX_PRIME_FOR_FLOAT_KERNEL + 10] * 2
    assert demo_hasher(rows_per_head=huge).kernel_for(big) == "eager"
    with pytest.raises(ValueError, match="kernel='eager'"):
        demo_hasher("compiled", rows_per_head=huge)
    with pytest.raises(ValueError, match="'auto', 'eager' or 'compiled'"):
        demo_hasher("fast")
    # inside a torch.compile'd caller the eager int64 ops are traced into its graph
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert h.kernel_for(big) == "eager" and demo_hasher("compiled").kernel_for(big) == "eager"


def test_auto_compiles_a_few_shapes_then_hashes_new_shapes_eagerly(monkeypatch, rng):
    """Evaluation over prompts of many lengths must not compile on every call."""
    import engram.hashing.ngram as ngram

    compiled_calls = []

    def fake_compiled():
        def run(ctx, *consts):
            compiled_calls.append(tuple(ctx.shape))
            return ngram._rows_float(ctx, *consts)  # the same numbers, eagerly
        return run

    monkeypatch.setattr(ngram, "_compiled_failed", None)
    monkeypatch.setattr(ngram, "_compiled_shapes", set())
    monkeypatch.setattr(ngram, "_cpu_compiler", lambda: None)
    monkeypatch.setattr(ngram, "_get_compiled", fake_compiled)
    h, eager = demo_hasher(), demo_hasher("eager")
    widths = [ngram.COMPILED_MIN_TOKENS // 2 + w for w in range(ngram.COMPILED_MAX_SHAPES + 3)]
    for width in widths + widths[:2]:  # shapes seen before keep their compiled kernel
        ids = torch.from_numpy(rng.integers(0, 1000, size=(2, width), dtype=np.int64))
        rows = h.hash(ids)
        assert all(torch.equal(rows[l], eager.hash(ids)[l]) for l in rows)
    assert len(set(compiled_calls)) == ngram.COMPILED_MAX_SHAPES
    assert len(compiled_calls) == ngram.COMPILED_MAX_SHAPES + 2


def test_auto_without_a_compiler_falls_back_exactly_and_says_so_once(monkeypatch, caplog, rng):
    import engram.hashing.ngram as ngram

    monkeypatch.setattr(ngram, "_compiled_failed", None)
    monkeypatch.setattr(ngram, "_cpu_compiler", lambda: "no C++ compiler for torch.compile (InvalidCxxCompiler)")
    monkeypatch.setattr(ngram, "_get_compiled", lambda: pytest.fail("the compiled kernel must not run"))
    h = demo_hasher()
    ids = torch.from_numpy(rng.integers(0, 1000, size=(4, ngram.COMPILED_MIN_TOKENS // 4), dtype=np.int64))
    with caplog.at_level("WARNING", logger="engram.hashing.ngram"):
        rows = h.hash(ids)
        again = h.hash(ids[:2])
    assert all(torch.equal(rows[l], demo_hasher("eager").hash(ids)[l]) for l in rows)
    assert torch.equal(again[4], rows[4][:2])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no C++ compiler" in lines[0] and "eager int64 kernel" in lines[0], lines


def test_auto_survives_a_compiler_that_fails(monkeypatch, caplog, rng):
    import engram.hashing.ngram as ngram

    def broken():
        def run(*args):
            raise RuntimeError("C++ compile error: cannot find Python.h")
        return run

    monkeypatch.setattr(ngram, "_compiled_failed", None)
    monkeypatch.setattr(ngram, "_compiled_shapes", set())
    monkeypatch.setattr(ngram, "_cpu_compiler", lambda: None)
    monkeypatch.setattr(ngram, "_get_compiled", broken)
    ids = torch.from_numpy(rng.integers(0, 1000, size=(2, ngram.COMPILED_MIN_TOKENS), dtype=np.int64))
    with caplog.at_level("WARNING", logger="engram.hashing.ngram"):
        rows = demo_hasher().hash(ids)
    assert all(torch.equal(rows[l], demo_hasher("eager").hash(ids)[l]) for l in rows)
    assert "torch.compile failed (RuntimeError: C++ compile error" in caplog.records[0].getMessage()
    assert demo_hasher().kernel_for(ids) == "eager"  # decided once for the process
    monkeypatch.setattr(ngram, "_compiled_failed", None)
    with pytest.raises(RuntimeError, match="C\\+\\+ compile error"):  # asked for explicitly: no fallback
        demo_hasher("compiled").hash(ids)


def test_unchecked_hashing_equals_checked(rng):
    h = demo_hasher("eager")
    ids = torch.from_numpy(rng.integers(0, 1000, size=(3, 17), dtype=np.int64))
    a, b = h.hash(ids), h.hash(ids, check=False)
    assert all(torch.equal(a[l], b[l]) for l in a)
    hist = h.initial_history(3)
    (ra, ha), (rb, hb) = h.hash_step(hist, ids[:, :5]), h.hash_step(hist, ids[:, :5], check=False)
    assert torch.equal(ha, hb) and all(torch.equal(ra[l], rb[l]) for l in ra)
    with pytest.raises(ValueError, match="compressed vocabulary"):
        h.hash(ids + 1000)


@pytest.mark.slow
def test_auto_compiles_big_cpu_batches_exactly(rng, monkeypatch):
    """The real thing: where inductor finds a C++ compiler, auto runs the compiled kernel."""
    import engram.hashing.ngram as ngram

    if ngram._cpu_compiler() is not None:
        pytest.skip(ngram._cpu_compiler())
    calls = []
    compiled = ngram._get_compiled()
    monkeypatch.setattr(ngram, "_get_compiled", lambda: (lambda *a: calls.append(1) or compiled(*a)))
    h = demo_hasher()
    ids = torch.from_numpy(rng.integers(0, 1000, size=(4, ngram.COMPILED_MIN_TOKENS // 4), dtype=np.int64))
    rows, want = h.hash(ids), demo_hasher("eager").hash(ids)
    assert calls and all(torch.equal(rows[l], want[l]) for l in rows)


def test_segment_ids_stop_ngrams_like_a_reset_id():
    """Packed documents given as segment ids hash like the same documents hashed one by one,
    and like a reset at the id that ends each document."""
    import dataclasses

    hasher = NgramHasher(layer_ids=[1], max_ngram_size=3, n_head_per_ngram=2, rows_per_head=[101, 103],
                         compressed_vocab_size=50, pad_id=0)
    eos = 49  # the reset id of the last part: no document draws it
    a, b = torch.randint(1, eos, (1, 6)), torch.randint(1, eos, (1, 5))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[0] * 6 + [1] * 5])
    rows = hasher.hash(packed, segment_ids=seg)[1]
    assert torch.equal(rows[:, :6], hasher.hash(a)[1]) and torch.equal(rows[:, 6:], hasher.hash(b)[1])
    assert not torch.equal(rows, hasher.hash(packed)[1])
    with pytest.raises(ValueError, match="segment_ids must have"):
        hasher.hash(packed, segment_ids=seg[:, :3])
    # the same documents separated by a reset id: the rows after it equal the second document's
    a[0, -1] = eos
    with_eos = torch.cat([a, b], 1)
    reset = NgramHasher.from_layout(dataclasses.replace(hasher.layout, reset_id=eos))
    assert torch.equal(reset.hash(with_eos)[1][:, 6:], hasher.hash(b)[1])
