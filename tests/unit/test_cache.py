"""CachedTable: exact rows from any MemoryTable, only misses read, exact statistics, and a
TinyLFU hit rate near an oracle's on Zipfian traffic (docs/paper.md, "System claims")."""

import threading

import numpy as np
import pytest
import torch

from engram.memory.cache import CachedTable
from engram.memory import InMemoryTable, MemoryTable


class CountingTable(MemoryTable):
    """Test double: rows from an InMemoryTable, and a record of every id it was asked for."""

    def __init__(self, inner: InMemoryTable) -> None:
        super().__init__(inner.table_sizes, inner.embedding_dim)
        self.inner = inner
        self.calls: list[torch.Tensor] = []

    def gather(self, flat_ids):
        self.calls.append(flat_ids.clone())
        return self.inner.gather(flat_ids)

    @property
    def rows_requested(self):
        return sum(c.numel() for c in self.calls)


@pytest.mark.parametrize("policy", ["tinylfu", "lru"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_to_backing_with_evictions(rng, policy, dtype):
    backing = InMemoryTable([97, 101, 89], 8, dtype=dtype)
    cache = CachedTable(backing, capacity_rows=40, policy=policy)
    shapes = [(5,), (3, 7), (2, 4, 3), (64,), (0,)]
    for i in range(60):
        shape = shapes[i % len(shapes)]
        # A skewed stream, so some rows are hot and the cache both hits and evicts.
        ids = torch.from_numpy(np.minimum(rng.zipf(1.3, size=shape) - 1, backing.num_rows - 1))
        out = cache.gather(ids)
        ref = backing.gather(ids)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.equal(out, ref), f"batch {i}: max diff {(out.float() - ref.float()).abs().max()}"
    rows_BTH = torch.stack([torch.randint(0, s, (2, 5)) for s in backing.table_sizes], -1)  # [B, T, H]
    assert torch.equal(cache(rows_BTH), backing(rows_BTH))  # forward: offsets, then gather
    s = cache.stats()
    assert s["evictions"] > 0 and s["hits"] > 0 and s["size"] == 40


def test_backing_is_asked_only_for_misses(rng):
    backing = CountingTable(InMemoryTable([50, 70], 4))
    cache = CachedTable(backing, capacity_rows=16)
    fetched = 0
    for i in range(40):
        ids = torch.from_numpy(np.minimum(rng.zipf(1.5, size=(3, 11)) - 1, backing.num_rows - 1))
        cached = set(cache.keys.tolist())
        expected = set(ids.flatten().tolist()) - cached
        n_calls = len(backing.calls)
        assert torch.equal(cache.gather(ids), backing.inner.gather(ids))
        if expected:
            asked = backing.calls[-1]
            assert len(backing.calls) == n_calls + 1
            assert asked.numel() == len(expected) and set(asked.tolist()) == expected  # unique misses only
        else:
            assert len(backing.calls) == n_calls  # all hits: the backing is not called
        fetched += len(expected)
    s = cache.stats()
    assert backing.rows_requested == fetched
    assert s["bytes_from_backing"] == fetched * 4 * 4  # rows x E x float32


def test_statistics_exact_tinylfu():
    cache = CachedTable(InMemoryTable([10], 2), capacity_rows=2, policy="tinylfu")
    steps = [  # ids, hits, fetched rows, evictions after the call
        ([1, 1, 2], 0, 2, 0),  # empty cache: 3 misses; 1 and 2 take the free slots
        ([1, 2, 3], 2, 1, 0),  # 3 seen once < min(freq 1, freq 2) = 2: not admitted
        ([3, 3, 3], 0, 1, 1),  # 3 seen 4 times > 2: admitted, evicting 1 or 2
        ([3, 4], 1, 1, 1),     # 4 seen once: not admitted
    ]
    for ids, hits, fetched, evictions in steps:
        before = cache.stats()
        cache.gather(torch.tensor(ids))
        s = cache.stats()
        assert s["hits"] - before["hits"] == hits, (ids, s)
        assert s["misses"] - before["misses"] == len(ids) - hits, (ids, s)
        assert s["bytes_from_backing"] - before["bytes_from_backing"] == fetched * 2 * 4, (ids, s)
        assert s["evictions"] == evictions, (ids, s)
    assert 3 in cache.keys.tolist()
    assert cache.stats() == dict(requests=11, unique_requests=8, hits=3, misses=8, hit_rate=3 / 11,
                                 bytes_from_backing=5 * 8, evictions=1, size=2)
    cache.reset_stats()
    assert cache.stats() == dict(requests=0, unique_requests=0, hits=0, misses=0, hit_rate=0.0,
                                 bytes_from_backing=0, evictions=0, size=2)


def test_statistics_exact_lru():
    cache = CachedTable(InMemoryTable([10], 2), capacity_rows=2, policy="lru")
    for ids in ([1, 1, 2], [2, 3], [3, 1], [2, 3]):  # misses: 1,1,2 | 3 (evicts 1) | 1 (evicts 2) | 2 (evicts 1)
        cache.gather(torch.tensor(ids))
    assert sorted(cache.keys.tolist()) == [2, 3]
    assert cache.stats() == dict(requests=9, unique_requests=8, hits=3, misses=6, hit_rate=3 / 9,
                                 bytes_from_backing=5 * 8, evictions=3, size=2)


def test_zipf_hit_rate_near_oracle():
    n, capacity, n_batches, batch, warmup = 100_000, 1_000, 200, 4096, 20
    gen = np.random.default_rng(0)  # fixed: the assertion is about this stream
    p = np.arange(1, n + 1, dtype=np.float64) ** -1.1  # Zipf, s = 1.1, rank 0 most frequent
    cdf = np.cumsum(p) / p.sum()
    ranks = np.minimum(np.searchsorted(cdf, gen.random(n_batches * batch)), n - 1).reshape(n_batches, batch)
    ids = torch.from_numpy(gen.permutation(n)[ranks])  # popularity unrelated to id order
    oracle = (ranks[warmup:] < capacity).mean()  # a static cache of the true top-capacity ids
    backing = InMemoryTable([n], 4)
    rates = {}
    for policy in ("tinylfu", "lru"):
        cache = CachedTable(backing, capacity_rows=capacity, policy=policy)
        for i in range(n_batches):
            if i == warmup:
                cache.reset_stats()
            cache.gather(ids[i])
        rates[policy] = cache.stats()["hit_rate"]
    print(f"hit rates: oracle {oracle:.4f}, {rates}")
    assert rates["tinylfu"] >= 0.85 * oracle, f"TinyLFU {rates['tinylfu']:.4f} vs oracle {oracle:.4f}"
    assert rates["tinylfu"] > rates["lru"], rates


def test_capacity_in_bytes():
    for dtype, itemsize in ((torch.float32, 4), (torch.bfloat16, 2)):
        backing = InMemoryTable([100, 100], 8, dtype=dtype)
        assert CachedTable(backing, capacity_bytes=1000).capacity == 1000 // (8 * itemsize)
        assert CachedTable(backing, capacity_bytes=8 * itemsize).capacity == 1
        assert CachedTable(backing, capacity_bytes=8 * itemsize).store.dtype == dtype
    assert CachedTable(InMemoryTable([10], 2), capacity_rows=10**9).capacity == 10  # capped at the table


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "exactly one"),
    (dict(capacity_rows=4, capacity_bytes=64), "exactly one"),
    (dict(capacity_rows=0), "capacity_rows must be >= 1"),
    (dict(capacity_rows=-3), "capacity_rows must be >= 1"),
    (dict(capacity_bytes=0), "holds no row"),
    (dict(capacity_bytes=31), "holds no row"),  # one float32 row of E=8 is 32 bytes
    (dict(capacity_rows=4, policy="fifo"), "policy"),
    (dict(capacity_rows=4, sample_size=0), "sample_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CachedTable(InMemoryTable([100], 8), **kwargs)


def test_no_gradient_and_threads(rng):
    backing = InMemoryTable([300], 4)
    cache = CachedTable(backing, capacity_rows=32)
    batches = [torch.from_numpy(np.minimum(rng.zipf(1.3, size=128) - 1, 299)) for _ in range(40)]
    assert not cache.gather(batches[0]).requires_grad  # inference only
    errors = []

    def worker(part):
        try:
            for ids in part:
                assert torch.equal(cache.gather(ids), backing.gather(ids).detach())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(batches[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    s = cache.stats()
    assert s["requests"] == 41 * 128 and s["hits"] + s["misses"] == s["requests"]
