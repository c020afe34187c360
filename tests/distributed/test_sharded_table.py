"""ShardedTable against the whole table in one process: rows, gradients (sparse and dense)."""

import pytest
import torch

from .launch import run_ranks

SIZES = (53, 61, 47)


def _rows(rank, B=2, T=5, sizes=SIZES):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.stack([torch.randint(0, s, (B, T), generator=g) for s in sizes], -1)  # [B, T, H]


def _upstream(rank, shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(200 + rank), dtype=torch.float64)


def _lookup(rank, world_size, sparse, sizes):
    from engram.distributed import ShardedTable
    from engram.memory import InMemoryTable

    torch.manual_seed(0)
    full = InMemoryTable(sizes, 4, sparse=sparse, dtype=torch.float64)  # the same on every rank
    table = ShardedTable.from_table(full)
    rows = _rows(rank, sizes=sizes)
    out = table(rows)
    (out * _upstream(rank, out.shape)).sum().backward()
    grad = table.weight.grad
    return {"equal": torch.equal(out, full(rows)), "start": table.row_start, "end": table.row_end,
            "sparse": grad.is_sparse, "grad": grad.to_dense()}


@pytest.mark.parametrize("world_size, sparse, sizes", [
    (2, True, SIZES), (4, False, (2,)), pytest.param(3, False, SIZES, marks=pytest.mark.slow)])
def test_rows_and_gradients_equal_the_whole_table(world_size, sparse, sizes):
    """Each rank reads the same rows as the whole table; the owners' gradient slices equal the
    whole table's gradient of the mean over ranks of their losses (1/W: data-parallel mean).
    (4 ranks on a 2-row table: two ranks own no rows and still take part.)"""
    from engram.memory import InMemoryTable

    results = run_ranks(_lookup, world_size, sparse, sizes)
    torch.manual_seed(0)
    full = InMemoryTable(sizes, 4, sparse=False, dtype=torch.float64)
    loss = 0
    for rank in range(world_size):
        out = full(_rows(rank, sizes=sizes))
        loss = loss + (out * _upstream(rank, out.shape)).sum() / world_size
    loss.backward()
    ref = full.weight.grad
    assert [r["start"] for r in results] == [min(i * -(-full.num_rows // world_size), full.num_rows)
                                             for i in range(world_size)]
    assert results[-1]["end"] == full.num_rows
    for r in results:
        assert r["equal"]
        assert r["sparse"] == sparse
        err = (r["grad"] - ref[r["start"]:r["end"]]).abs().max().item() if r["end"] > r["start"] else 0.0
        assert err < 1e-12, f"rank rows [{r['start']}, {r['end']}): gradient differs by {err}"


def _overlay(rank, world_size):
    from engram.distributed import ShardedTable
    from engram.memory import InMemoryTable
    from engram.memory.overlay import OverlayTable, read_rows, rows_sha256

    torch.manual_seed(0)
    full = InMemoryTable(SIZES, 4, dtype=torch.float64)  # the same on every rank
    sharded = ShardedTable.from_table(full)
    read = torch.cat([(_rows(r) + full.offsets).flatten() for r in range(world_size)]).unique()
    rows = torch.cat([read[:3], read[-3:]])  # rows both ranks' lookups read, in both ranks' slices
    values = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    before_ok = rows_sha256(read_rows(sharded, rows)) == rows_sha256(full.weight.detach()[rows])  # collective read
    ids = _rows(rank)
    with torch.no_grad():
        got = OverlayTable(sharded, rows, values)(ids)
        want = OverlayTable(full, rows, values)(ids)
        changed = not torch.equal(want, full(ids))  # the overlay's rows are read, and differ
    return {"before_ok": before_ok, "equal": torch.equal(got, want), "hit": changed}


def test_an_overlay_over_a_sharded_table_equals_it_over_the_whole_table():
    """Every rank serves the overlay's rows over its shard exactly as over the whole table, and
    the base-row check reads the sharded rows (a collective gather) as the whole table's."""
    results = run_ranks(_overlay, 2)
    assert all(r["before_ok"] and r["equal"] for r in results) and all(r["hit"] for r in results)
