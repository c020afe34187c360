"""The row index against a brute-force count of the hasher's own rows, and row edits that touch
exactly the rows they say (checked bit for bit), replay on their parent and refuse anything else."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from engram.hashing.layout import HashLayout
from engram.hashing.ngram import NgramHasher
from engram.memory.editing import (BEFORE_START, PatchedTable, addressed_rows, forget_rows, replay, row_sha256)
from engram.memory.row_index import RowIndex, RowIndexError, head_offsets
from engram.memory import InMemoryTable

V = 40


def make_hasher(reset_id=None, seed=0, sizes=(31, 37)):
    layout = HashLayout.build(layer_ids=(1, 3), max_ngram_size=3, n_head_per_ngram=2, rows_per_head=sizes,
                              compressed_vocab_size=V, pad_id=0, seed=seed)
    if reset_id is not None:
        layout = dataclasses.replace(layout, reset_id=reset_id)
    return NgramHasher.from_layout(layout, kernel="eager")


def stream(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, 12, size=n)  # few ids: grams repeat, rows collide


@pytest.mark.parametrize("reset_id", [None, 5])
def test_reads_and_partners_equal_a_brute_force_count_of_the_stream(reset_id):
    hasher = make_hasher(reset_id)
    ids = stream()
    index = RowIndex.build(hasher, np.array_split(ids, 7), min_count=2)  # chunk borders must not matter
    rows = hasher.hash(torch.from_numpy(ids)[None])
    N, K = 3, 2
    padded = np.concatenate([[0] * (N - 1), ids])
    for layer, rows_TH in rows.items():
        rows_TH = rows_TH[0].numpy()
        flat = rows_TH + head_offsets(hasher.layout, layer)
        expect = np.bincount(flat.reshape(-1), minlength=sum(hasher.table_sizes[layer]))
        assert np.array_equal(index.reads[layer], expect)
        for head in range(rows_TH.shape[1]):
            m = 2 + head // K
            # every gram of the stream at its row; the index lists those seen >= 2 times
            seen = {}
            for t in range(len(ids)):
                gram = padded[t + N - m:t + N]
                if reset_id is not None and reset_id in gram[:-1]:  # the hasher's view: pad before a reset
                    last = max(j for j in range(m - 1) if gram[j] == reset_id)
                    gram = np.concatenate([[0] * (last + 1), gram[last + 1:]])
                seen.setdefault(tuple(gram.tolist()), (int(rows_TH[t, head]), 0))
                row, c = seen[tuple(gram.tolist())]
                assert row == rows_TH[t, head]  # a gram always lands on one row
                seen[tuple(gram.tolist())] = (row, c + 1)
            for row in (int(rows_TH[0, head]), int(rows_TH[100, head])):
                grams, counts = index.partners(layer, head, row)
                want = sorted(((c, g) for g, (r, c) in seen.items() if r == row and c >= 2), reverse=True)
                assert sorted(zip(counts.tolist(), map(tuple, grams.tolist())), reverse=True) == want
                assert counts.tolist() == sorted(counts.tolist(), reverse=True)  # most frequent first
    some = tuple(padded[10:12].tolist())
    assert index.count(some) == sum(1 for t in range(len(ids)) if tuple(padded[t + 1:t + 3].tolist()) == some)


def test_index_round_trips_and_refuses_corruption_and_other_layouts(tmp_path):
    hasher = make_hasher()
    index = RowIndex.build(hasher, [stream()], source={"run": "r"})
    index.save(tmp_path / "idx")
    back = RowIndex.load(tmp_path / "idx", hasher.layout)
    assert all(np.array_equal(back.reads[k], v) for k, v in index.reads.items())
    assert back.partners(1, 3, 5)[1].tolist() == index.partners(1, 3, 5)[1].tolist()
    with pytest.raises(RowIndexError, match="another hash layout"):
        RowIndex.load(tmp_path / "idx", make_hasher(seed=1).layout)
    raw = bytearray((tmp_path / "idx" / "index.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "idx" / "index.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RowIndexError, match="checksum"):
        RowIndex.load(tmp_path / "idx")
    with pytest.raises(RowIndexError, match="no row index"):
        RowIndex.load(tmp_path / "nothing")


def tables_for(hasher):
    torch.manual_seed(0)
    return {layer: InMemoryTable(sizes, 8) for layer, sizes in hasher.table_sizes.items()}


def test_forget_changes_exactly_the_owned_rows_and_replays_bit_for_bit():
    hasher = make_hasher(sizes=(401, 409))  # big enough that a rare text owns rows
    ids = stream()
    index = RowIndex.build(hasher, [ids])
    text = np.array([20, 21, 22, 23, 3, 4])  # ids 20+ never occur in the stream: its grams are its own
    rows = addressed_rows(hasher, text, index, max_count=10)
    assert {r.skip for r in rows if r.positions == [0] and r.order == 3} == {BEFORE_START}
    owned = [r for r in rows if r.skip is None]
    assert owned and any(r.skip for r in rows)
    assert all(r.gram_count == 0 for r in owned if 20 <= r.gram_ids[-1])
    tables = tables_for(hasher)
    before = {layer: t.weight.detach().clone() for layer, t in tables.items()}
    log = forget_rows(tables, rows, mode="zero", index=index)
    for layer, t in tables.items():
        changed = torch.tensor(sorted(r.flat_row for r in owned if r.layer == layer))
        keep = torch.ones(t.num_rows, dtype=torch.bool)
        keep[changed] = False
        assert torch.equal(t.weight[keep], before[layer][keep])  # every other row: same bits
        assert torch.count_nonzero(t.weight[changed]) == 0
    assert len(log.changed) == len(owned) and len(log.skipped) == len(rows) - len(owned)
    assert all(e["reason"] for e in log.skipped)
    # replay on a fresh copy of the parent gives the same bits; a second replay is refused
    parent = tables_for(hasher)
    n = replay(parent, json.loads(json.dumps(log.to_dict())), log.tensors())
    assert n == len(owned) and all(torch.equal(parent[k].weight, tables[k].weight) for k in tables)
    with pytest.raises(ValueError, match="before_sha256"):
        replay(parent, log.to_dict(), log.tensors())


def test_mean_mode_uses_the_rows_training_read_and_force_takes_every_row():
    hasher = make_hasher(sizes=(401, 409))
    index = RowIndex.build(hasher, [stream()])
    rows = addressed_rows(hasher, np.array([3, 4, 5, 6]), index)
    with pytest.raises(ValueError, match="none of the text's"):
        forget_rows(tables_for(hasher), [r for r in rows if r.skip], index=index)
    tables = tables_for(hasher)
    r = rows[0]
    t = tables[r.layer]
    start, size = int(t.offsets[r.head]), t.table_sizes[r.head]
    used = torch.from_numpy(index.reads[r.layer][start:start + size] > 0)
    want = t.weight.detach()[start:start + size][used].mean(0)
    log = forget_rows(tables, rows, mode="mean", force=True, index=index)
    assert len(log.changed) == len(rows)
    assert torch.allclose(t.weight[r.flat_row], want)
    with pytest.raises(ValueError, match="'zero' or 'mean'"):
        forget_rows(tables_for(hasher), rows, mode="noise", force=True)


def test_an_empty_text_and_another_layouts_index_are_refused():
    hasher = make_hasher()
    index = RowIndex.build(hasher, [stream()])
    with pytest.raises(ValueError, match="no tokens"):
        addressed_rows(hasher, np.array([], dtype=np.int64), index)
    with pytest.raises(RowIndexError, match="another hash layout"):
        addressed_rows(make_hasher(seed=3), np.array([1, 2]), index)


def test_patched_table_reads_its_values_on_its_rows_only_and_commits_them():
    base = InMemoryTable([11, 13], 4)
    base.weight.requires_grad_(False)
    patch = PatchedTable(base, [3, 15])
    ids = torch.tensor([[0, 3, 15, 23, 3]])
    assert torch.equal(patch.gather(ids), base.gather(ids))
    with torch.no_grad():
        patch.values += 1
    out = patch.gather(ids)
    assert torch.equal(out[0, [0, 3]], base.gather(ids)[0, [0, 3]])
    assert torch.equal(out[0, [1, 2, 4]], base.gather(ids)[0, [1, 2, 4]] + 1)
    before = row_sha256(base, [3, 15, 4])
    patch.commit()
    after = row_sha256(base, [3, 15, 4])
    assert before[0] != after[0] and before[1] != after[1] and before[2] == after[2]
