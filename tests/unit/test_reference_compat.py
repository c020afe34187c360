"""Parity with the public demo's Engram forward (re-implemented here from its published code)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from engram import NgramHasher
from engram.compat import export_reference_state_dict, reference_engram
from engram.compat.numpy_reference import numpy_hash, numpy_layout

DEMO = dict(engram_vocab_size=[131, 137], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=4,
            layer_ids=[1, 5], kernel_size=4, hidden_size=32, hc_mult=4)
V, PAD, LAYER = 500, 2, 5


class DemoShortConv(nn.Module):
    """The demo's ShortConv: per-stream RMSNorm(eps 1e-5), depthwise conv padded both sides, cut to T, SiLU."""

    def __init__(self, hidden_size, kernel_size, dilation, hc_mult):
        super().__init__()
        ch = hidden_size * hc_mult
        self.conv = nn.Conv1d(ch, ch, kernel_size, groups=ch, bias=False,
                              padding=(kernel_size - 1) * dilation, dilation=dilation)
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=1e-5) for _ in range(hc_mult)])

    def forward(self, x):
        B, T, G, C = x.shape
        xn = torch.cat([self.norms[i](x[:, :, i, :]) for i in range(G)], dim=-1)
        y = self.conv(xn.transpose(1, 2))[..., :T]
        return nn.functional.silu(y).transpose(1, 2).reshape(B, T, G, C)


class DemoMultiHeadEmbedding(nn.Module):
    def __init__(self, sizes, dim):
        super().__init__()
        self.register_buffer("offsets", torch.tensor(np.cumsum([0] + sizes[:-1]), dtype=torch.long))
        self.embedding = nn.Embedding(sum(sizes), dim)

    def forward(self, ids):
        return self.embedding(ids + self.offsets)


class DemoEngram(nn.Module):
    """The demo's Engram, fed the hash rows its NgramHashMapping would compute."""

    def __init__(self, sizes, cfg):
        super().__init__()
        d, M = cfg["hidden_size"], cfg["hc_mult"]
        d_mem = (cfg["max_ngram_size"] - 1) * cfg["n_embed_per_ngram"]
        self.hidden_size, self.hc_mult = d, M
        self.multi_head_embedding = DemoMultiHeadEmbedding(sizes, cfg["n_embed_per_ngram"] // cfg["n_head_per_ngram"])
        self.short_conv = DemoShortConv(d, cfg["kernel_size"], cfg["max_ngram_size"], M)
        self.value_proj = nn.Linear(d_mem, d)
        self.key_projs = nn.ModuleList([nn.Linear(d_mem, d) for _ in range(M)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(d) for _ in range(M)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(d) for _ in range(M)])

    def forward(self, hidden, hash_rows):
        emb = self.multi_head_embedding(hash_rows).flatten(start_dim=-2)
        gates = []
        for i in range(self.hc_mult):
            g = (self.norm1[i](self.key_projs[i](emb)) * self.norm2[i](hidden[:, :, i, :])).sum(-1)
            g = g / math.sqrt(self.hidden_size)
            gates.append((g.abs().clamp_min(1e-6).sqrt() * g.sign()).sigmoid().unsqueeze(-1))
        value = torch.stack(gates, dim=2) * self.value_proj(emb).unsqueeze(2)
        return value + self.short_conv(value)


@pytest.fixture
def demo():
    mults, primes = numpy_layout(DEMO["layer_ids"], 3, DEMO["n_head_per_ngram"], DEMO["engram_vocab_size"], V, 0)
    sizes = [p for order in primes[LAYER] for p in order]
    module = DemoEngram(sizes, DEMO)
    with torch.no_grad():  # norms away from 1 so a swapped norm would show
        for name, p in module.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return module, mults, primes


def test_forward_matches_the_demo(demo, rng):
    ref, mults, primes = demo
    ours = reference_engram(layer_id=LAYER, compressed_vocab_size=V, compressed_pad_id=PAD,
                            state_dict=ref.state_dict(), **DEMO)
    ids = rng.integers(0, V, size=(3, 40), dtype=np.int64)
    ref_rows = torch.from_numpy(numpy_hash(ids, DEMO["layer_ids"], mults, primes, PAD)[LAYER])
    hasher = NgramHasher.from_config(ours.config)
    rows = hasher.hash(torch.from_numpy(ids))[LAYER]
    assert torch.equal(rows, ref_rows)
    hidden = torch.randn(3, 40, 4, 32)
    with torch.no_grad():
        expected, got = ref(hidden, ref_rows), ours(hidden, rows)
    err = (expected - got).abs().max().item()
    assert err < 1e-5, f"max |demo - ours| = {err}"
    assert (ours.short_conv(expected) != 0).any()  # the conv path is live, not zero-init


def test_export_round_trips_the_demo_state_dict(demo):
    ref, _, _ = demo
    ours = reference_engram(layer_id=LAYER, compressed_vocab_size=V, compressed_pad_id=PAD,
                            state_dict=ref.state_dict(), **DEMO)
    exported = export_reference_state_dict(ours)
    expected = ref.state_dict()
    assert sorted(exported) == sorted(expected)
    for k in expected:
        assert torch.equal(exported[k], expected[k]), k
    ref2 = DemoEngram(list(ours.table.table_sizes), DEMO)
    ref2.load_state_dict(exported)  # strict: the demo accepts what we export


def test_mismatched_state_dicts_are_clear_errors(demo):
    ref, _, _ = demo
    sd = ref.state_dict()
    with pytest.raises(ValueError, match="hash layout mismatch"):
        reference_engram(layer_id=1, compressed_vocab_size=V, compressed_pad_id=PAD, state_dict=sd, **DEMO)
    sd.pop("norm2.3.weight")
    with pytest.raises(ValueError, match=r"missing \['norm2.3.weight'\]"):
        reference_engram(layer_id=LAYER, compressed_vocab_size=V, compressed_pad_id=PAD, state_dict=sd, **DEMO)
    with pytest.raises(ValueError, match="not one of the Engram layers"):
        reference_engram(layer_id=7, compressed_vocab_size=V, compressed_pad_id=PAD, **DEMO)


def test_demo_fields_are_named_and_the_raw_pad_id_needs_its_compression():
    """The demo's pad_id is a raw id; ours is compressed. A bare int is refused, the raw id is
    mapped through the compression the demo's way, and a missing field is named."""
    import numpy as np

    from engram.compat.reference import reference_config

    with pytest.raises(ValueError, match="raw token id"):
        reference_engram(layer_id=LAYER, compressed_vocab_size=V, pad_id=7, **DEMO)
    table = np.arange(V + 40) % V  # raw 7 -> compressed 7; raw 507 -> compressed 7
    assert reference_config(compressed_vocab_size=V, pad_id=507, compression=table, **DEMO).pad_id == 7
    assert reference_config(compressed_vocab_size=V, compressed_pad_id=5, **DEMO).pad_id == 5
    fields = {k: v for k, v in DEMO.items() if k != "kernel_size"}
    with pytest.raises(TypeError, match="kernel_size"):
        reference_engram(layer_id=LAYER, compressed_vocab_size=V, **fields)
