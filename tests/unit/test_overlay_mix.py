"""Several overlays over one table, chosen per token (what a server batching many users'
requests needs): each token reads exactly the rows of the table with its own stack of
overlays written into it, in order; one overlay chosen for all equals `OverlayTable`."""

import pytest
import torch

from engram.memory.disk_format import DiskTable
from engram.memory.host import HostTable
from engram.memory.in_memory import InMemoryTable
from engram.memory.overlay import OverlayError, OverlayTable
from engram.memory.overlay_mix import MixedOverlayTable, check_overlay_names

SIZES, E = [61, 67, 71], 8


def base_table():
    torch.manual_seed(0)
    table = InMemoryTable(SIZES, E)
    with torch.no_grad():
        table.weight.normal_()
    return table


def overlays():
    """Three overlays; the second and third change some of the first's rows."""
    gen = torch.Generator().manual_seed(1)
    rows = [torch.tensor([0, 5, 60, 61, 100, 198]), torch.tensor([5, 61, 62, 150]), torch.tensor([5, 100, 198])]
    return [(r, torch.randn(r.numel(), E, generator=gen)) for r in rows]


def materialized(weight, stack, ovs):
    w = weight.detach().clone()
    for k in stack:
        rows, values = ovs[k]
        w[rows] = values
    return w


@pytest.mark.parametrize("kind", ["resident", "host", "disk"])
def test_each_token_reads_the_table_with_its_own_stack_written_in(kind, tmp_path):
    table, ovs = base_table(), overlays()
    base = {"resident": table, "host": HostTable.from_table(table) if kind == "host" else None,
            "disk": DiskTable.open(DiskTable.write(tmp_path / "t", table.weight.detach(), SIZES))
            if kind == "disk" else None}[kind]
    mixed = MixedOverlayTable(base, ovs)
    T = 9
    gen = torch.Generator().manual_seed(2)
    rows_1TH = torch.stack([torch.randint(0, s, (1, T), generator=gen) for s in SIZES], dim=-1)
    rows_1TH[0, :, 0] = torch.tensor([0, 5, 60, 5, 0, 60, 5, 5, 0])  # rows the overlays change
    rows_1TH[0, :, 1] = torch.tensor([0, 1, 39, 0, 1, 33, 0, 0, 1])  # flat 61, 62, 100, ...
    stacks = [[], [0], [1], [2], [0, 1], [1, 0], [0, 1, 2], [2, 0], []]
    choice = torch.full((T, 3), -1)
    for t, s in enumerate(stacks):
        choice[t, :len(s)] = torch.tensor(s, dtype=torch.long)
    mixed.choose(choice)
    got = mixed(rows_1TH)
    flat = rows_1TH + table.offsets
    for t, stack in enumerate(stacks):
        want = materialized(table.weight, stack, ovs)[flat[0, t]]
        assert torch.equal(got[0, t], want), (t, stack)
    mixed.choose(None)
    assert torch.equal(mixed(rows_1TH), table(rows_1TH))


def test_one_overlay_for_every_token_equals_the_offline_overlay_table():
    table, ovs = base_table(), overlays()
    rows_1TH = torch.stack([torch.arange(s)[:40].view(1, 40) for s in SIZES], dim=-1)
    mixed = MixedOverlayTable(table, ovs)
    mixed.choose(torch.full((40, 1), 1))
    assert torch.equal(mixed(rows_1TH), OverlayTable(table, *ovs[1])(rows_1TH))


def test_bad_choices_and_names_are_refused():
    table, ovs = base_table(), overlays()
    mixed = MixedOverlayTable(table, ovs)
    with pytest.raises(ValueError, match="overlay index 3 chosen; this table has 3"):
        mixed.choose(torch.tensor([[3]]))
    mixed.choose(torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="covers 4 tokens; this gather has 5"):
        mixed(torch.zeros(1, 5, 3, dtype=torch.long))
    with pytest.raises(OverlayError, match="sorted, unique"):
        MixedOverlayTable(table, [(torch.tensor([3, 2]), torch.zeros(2, E))])
    with pytest.raises(OverlayError, match="overlay name 'a b'"):
        check_overlay_names({"a b": "/x"})
    assert check_overlay_names({"alice.v2": "/x"}) == {"alice.v2": "/x"}
