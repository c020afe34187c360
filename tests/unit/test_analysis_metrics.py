"""engram.analysis metrics: unbiased linear CKA, soft alignment, LogitLens KL, table statistics."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from engram import EngramLM, presets
from engram.analysis.cka import cka_matrix, linear_cka, plot_cka, soft_alignment_index
from engram.analysis.logit_lens import logit_lens_kl, plot_logit_lens
from engram.analysis.table_stats import plot_table_stats, summarize, table_statistics
from engram.config import EngramConfig, ModelConfig

PNG = b"\x89PNG\r\n\x1a\n"


def hsic1_u_statistic(X, Y):
    """Song et al. 2012's unbiased HSIC as the U-statistic over distinct index tuples (loops)."""
    n = X.shape[0]
    K, L = X @ X.T, Y @ Y.T
    pairs = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2))
    triples = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3))
    quads = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4))
    falling = lambda m: math.prod(range(n - m + 1, n + 1))  # n (n-1) ... (n-m+1)
    return pairs / falling(2) + quads / falling(4) - 2 * triples / falling(3)


# ---------------------------------------------------------------- CKA
def test_cka_matches_a_double_loop_u_statistic(rng):
    X, Y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    Y[:, 0] += X[:, 0]  # some shared structure
    want = hsic1_u_statistic(X, Y) / math.sqrt(hsic1_u_statistic(X, X) * hsic1_u_statistic(Y, Y))
    assert linear_cka(X, Y) == pytest.approx(want, abs=1e-10)
    assert cka_matrix([torch.tensor(X)], [torch.tensor(Y)])[0, 0] == pytest.approx(want, abs=1e-10)


def test_cka_of_a_representation_with_itself_is_one(rng):
    X = rng.normal(size=(64, 16)) + 3.0  # an offset: unbiased HSIC needs no feature centering
    assert abs(linear_cka(X, X) - 1.0) < 1e-6


def test_cka_is_invariant_to_orthogonal_maps_and_isotropic_scaling(rng):
    X = rng.normal(size=(80, 12))
    Y = X[:, :6] @ rng.normal(size=(6, 10)) + 0.5 * rng.normal(size=(80, 10))
    Q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    base = linear_cka(X, Y)
    assert 0.05 < base < 0.999
    assert linear_cka(X @ Q, Y) == pytest.approx(base, abs=1e-9)
    assert linear_cka(4.5 * X, 0.01 * Y) == pytest.approx(base, abs=1e-9)


def test_cka_needs_four_samples_and_equal_rows(rng):
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(rng.normal(size=(3, 5)), rng.normal(size=(3, 5)))
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(rng.normal(size=(6, 5)), rng.normal(size=(7, 5)))
    assert math.isnan(linear_cka(np.ones((6, 2)), rng.normal(size=(6, 3))))  # constant: undefined


def test_cka_matrix_flattens_subsamples_and_agrees_with_linear_cka(rng):
    hidden = [torch.tensor(rng.normal(size=(2, 30, 8))) for _ in range(3)]
    other = [h[..., :5] * 2 + 0.3 * torch.randn(2, 30, 5, dtype=torch.float64) for h in hidden]
    S = cka_matrix(hidden, other, max_samples=None)
    assert S.shape == (3, 3)
    for i, j in itertools.product(range(3), range(3)):
        assert S[i, j] == pytest.approx(linear_cka(hidden[i], other[j]), abs=1e-9)
    self_S = cka_matrix(hidden, hidden, max_samples=40)
    np.testing.assert_allclose(np.diag(self_S), 1.0, atol=1e-9)
    np.testing.assert_array_equal(self_S, cka_matrix(hidden, hidden, max_samples=40))  # seeded
    with pytest.raises(ValueError, match="same positions"):
        cka_matrix(hidden, [h[:1] for h in other])


# ---------------------------------------------------------------- soft alignment
def test_soft_alignment_index_on_constructed_similarities():
    L = 8
    idx = np.arange(L)
    band = 1.0 - np.abs(idx[:, None] - idx[None, :]) / L  # peaked at j = i, symmetric
    a = soft_alignment_index(band, k=5)
    np.testing.assert_allclose(a[2:L - 2], idx[2:L - 2], atol=1e-12)  # symmetric top-5 around i
    assert a[0] > 0 and a[-1] < L - 1  # at the edges the top-5 lies on one side
    np.testing.assert_allclose(soft_alignment_index(np.eye(L), k=1), idx)
    np.testing.assert_allclose(soft_alignment_index(band, k=5, weighting="linear")[2:L - 2], idx[2:L - 2])
    S = np.array([[0.1, 0.9, 0.5, 0.2]])
    w1 = math.exp(0.9) / (math.exp(0.9) + math.exp(0.5))
    assert soft_alignment_index(S, k=2, weighting="softmax")[0] == pytest.approx(w1 * 1 + (1 - w1) * 2)
    assert soft_alignment_index(S, k=2, weighting="linear")[0] == pytest.approx((0.9 + 2 * 0.5) / 1.4)
    assert soft_alignment_index(np.tile(S, (3, 2)), k=99).shape == (3,)  # k capped at Lb
    with pytest.raises(ValueError):
        soft_alignment_index(S, k=0)


# ---------------------------------------------------------------- LogitLens
def lens_config(M):
    return dataclasses.replace(presets.tiny(vocab_size=64, n_layers=3, engram=False), n_streams=M, engram=EngramConfig(
        compressed_vocab_size=64, pad_id=0, layer_ids=(1,), rows_per_head=(101, 103), n_head_per_ngram=2,
        n_embed_per_ngram=16))


@pytest.mark.parametrize("M", [1, 4])
def test_logit_lens_kl_is_zero_at_the_last_layer_and_nonnegative(M):
    torch.manual_seed(0)
    model = EngramLM(lens_config(M)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kl = logit_lens_kl(model, torch.randint(0, 64, (2, 12)))
    assert kl.shape == (3,) and kl.dtype == np.float64
    assert abs(kl[-1]) < 1e-6
    assert (kl >= 0).all() and kl[0] > 1e-4
    assert model.training  # mode restored, weights untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- table statistics
def stats_model():
    """Compressed vocab 8 (ids i and i+8 merge), one Engram layer, K = 1: a 2-row bigram
    table (collisions everywhere) and a 100003-row trigram table (none on a small corpus)."""
    config = ModelConfig(
        vocab_size=16, hidden_size=16, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=32, max_seq_len=64,
        engram=EngramConfig(compressed_vocab_size=8, pad_id=0, layer_ids=(1,), rows_per_head=(2, 100_000),
                            max_ngram_size=3, n_head_per_ngram=1, n_embed_per_ngram=4,
                            table_init_std=1.0))  # N(0, 1) rows: row norms worth checking
    torch.manual_seed(0)
    return EngramLM(config, compression=np.arange(16) % 8)


def by_hand(model, batches, order, head):
    """Distinct n-grams -> rows with the hash contract in Python ints; (collision, touched)."""
    mults, p = model.layout.multipliers[1], model.layout.primes[1][head]
    row_of = {}
    for ids in batches:
        for seq in (ids % 8).tolist():
            ctx = [0] * (order - 1) + seq
            for t in range(order - 1, len(ctx)):
                gram = tuple(ctx[t - order + 1:t + 1])
                mix = 0
                for k in range(order):
                    mix ^= gram[order - 1 - k] * mults[k]
                row_of[gram] = mix % p
    rows = list(row_of.values())
    collided = sum(rows.count(r) > 1 for r in rows)
    return collided / len(rows), len(set(rows)) / p, len(rows)


def test_table_statistics_count_collisions_and_touched_rows_by_hand():
    model = stats_model()
    assert model.layout.primes[1] == (2, 100003)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 16, (3, 20), generator=g), torch.randint(0, 16, (2, 9), generator=g)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = table_statistics(model, batches)[1]
    tokens = 3 * 20 + 2 * 9
    assert s["tokens"] == tokens and s["orders"] == [2, 3] and s["table_sizes"] == [2, 100003]
    for head, order in ((0, 2), (1, 3)):
        collision, touched, distinct = by_hand(model, batches, order, head)
        assert s["distinct_ngrams"][head] == distinct
        assert s["collision_rate"][head] == pytest.approx(collision)
        assert s["rows_touched"][head] == pytest.approx(touched)
    assert s["collision_rate"][0] >= (s["distinct_ngrams"][0] - 1) / s["distinct_ngrams"][0]  # 2 rows
    assert s["rows_touched"][0] == 1.0
    assert s["collision_rate"][1] == 0.0  # ~tens of trigrams in 100003 rows
    assert s["expected_collision_rate"][0] > 0.99 and s["expected_collision_rate"][1] < 0.01
    u = s["usage"]
    assert u.shape == (100005,) and u[:2].sum() == tokens and u[2:].sum() == tokens
    assert s["rows_touched_overall"] == pytest.approx((u > 0).sum() / 100005)
    weight = model.blocks[1].engram.table.weight
    np.testing.assert_allclose(s["row_norms"], weight.detach().norm(dim=1).numpy(), rtol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    summary = summarize({1: s})["1"]
    assert "usage" not in summary and summary["row_norm_mean_untouched"] > 0


def test_table_statistics_needs_engram():
    model = EngramLM(presets.tiny(vocab_size=64, engram=False))
    with pytest.raises(ValueError, match="no Engram"):
        table_statistics(model, [torch.zeros(1, 4, dtype=torch.long)])


# ---------------------------------------------------------------- plots
def test_plots_are_written_as_png(tmp_path, rng):
    paths = [plot_logit_lens({"engram": [0.5, 0.2, 0.0], "moe": [0.9, 0.4, 0.1, 0.0]}, tmp_path / "lens.png")]
    S = np.clip(1 - np.abs(np.arange(4)[:, None] - np.arange(6)[None, :]) / 6 + 0.01 * rng.normal(size=(4, 6)), 0, 1)
    paths.append(plot_cka(S, tmp_path / "cka.png", labels=("Engram", "MoE")))
    model = stats_model()
    paths += plot_table_stats(table_statistics(model, [torch.randint(0, 16, (2, 16))]), tmp_path / "tables")
    assert len(paths) == 4
    for path in paths:
        assert path.read_bytes()[:8] == PNG
