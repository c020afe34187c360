"""Memory overlays: applied at lookup time over every table kind, bit-identical to the
materialized edit on the resident table, stacked in order, and refused by name when they do not
belong (another layout, another parent, changed base rows, a corrupt file)."""

import copy
import json

import pytest
import torch

from engram.memory.cache import CachedTable
from engram.memory.disk_format import DiskTable
from engram.memory.host import HostTable
from engram.memory.overlay import (OVERLAY_JSON, OVERLAY_ROWS, Overlay, OverlayError, OverlayTable, apply_overlays,
                                   read_rows, rows_sha256)
from engram.memory.quantized import QuantizedTable
from tests.tiny import build, small_config

LAYER = 1


def edit(model, flat_rows, seed=0, materialize=True):
    """(the edited copy or None, the overlay of that edit): random new values for `flat_rows` of
    LAYER; the copy (resident tables) has them written into its table."""
    rows = torch.tensor(sorted(flat_rows))
    table = model.blocks[LAYER].engram.table
    values = torch.randn(len(rows), table.embedding_dim, generator=torch.Generator().manual_seed(seed))
    overlay = Overlay(model.layout.to_dict(), {"checkpoint": "parent", "weights_sha256": "aa" * 32},
                      {LAYER: (rows, values)}, {LAYER: rows_sha256(read_rows(table, rows))})
    if not materialize:
        return None, overlay
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited.blocks[LAYER].engram.table.weight[rows] = values
    return edited, overlay


def ids():
    return torch.randint(1, 97, (2, 24), generator=torch.Generator().manual_seed(3))


def rows_read(model):
    return model.hasher.hash(model.compress(ids()), check=False)[LAYER] + model.blocks[LAYER].engram.table.offsets


def test_an_overlay_gives_the_edited_models_logits_bit_for_bit_and_round_trips(tmp_path):
    model = build(small_config(M=2))
    read = rows_read(model).flatten().unique()
    edited, overlay = edit(model, read[:7].tolist())
    overlay.save(tmp_path / "ov")
    loaded = Overlay.load(tmp_path / "ov")
    base_table = model.blocks[LAYER].engram.table
    apply_overlays(model, [loaded])
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, edited(ids()).logits)
    assert model.blocks[LAYER].engram.table.base is base_table  # the base is wrapped, not copied or changed
    manifest = json.loads((tmp_path / "ov" / OVERLAY_JSON).read_text())
    assert manifest["changed_rows"] == 7 and manifest["rows_file"]["bytes"] < 7 * 8 * (8 + 4 * 8) + 1024


@pytest.mark.parametrize("kind", ["host", "disk", "cached", "int8"])
def test_over_every_table_kind_the_overlay_rows_replace_exactly_those_rows(kind, tmp_path):
    model = build(small_config())
    table = model.blocks[LAYER].engram.table
    if kind == "host":
        base = HostTable.from_table(table)
    elif kind == "disk":
        base = DiskTable.open(DiskTable.write(tmp_path / "t", table.weight.detach(), table.table_sizes))
    elif kind == "cached":
        base = CachedTable(HostTable.from_table(table), capacity_rows=16)
    else:
        base = QuantizedTable.open(QuantizedTable.write(tmp_path / "q", table.weight.detach(), table.table_sizes,
                                                        "int8"))
    model.set_table(LAYER, base)
    rows = torch.tensor([3, 40, 101, 250])
    model.set_table(LAYER, table)  # the edit is made on the resident parent
    _, overlay = edit(model, rows.tolist(), materialize=False)
    model.set_table(LAYER, base)
    if kind == "int8":  # the base rows are the quantized ones, not the rows the edit was made on
        with pytest.raises(OverlayError, match="differ from the rows it was made on.*--force"):
            apply_overlays(model, [overlay])
    apply_overlays(model, [overlay], force=kind == "int8")
    served = model.blocks[LAYER].engram.table
    every = torch.arange(table.num_rows)
    got, plain = read_rows(served, every), read_rows(base, every)
    assert torch.equal(got[rows], overlay.rows[LAYER][1])
    keep = torch.ones(table.num_rows, dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(got[keep], plain[keep])


def test_overlays_stack_in_order_and_equal_the_edits_made_one_after_the_other():
    model = build(small_config())
    first_edit, first = edit(model, [5, 6, 7], seed=1)
    both, second = edit(first_edit, [7, 8], seed=2)  # made on the first edit's result
    apply_overlays(model, [first, second])
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, both(ids()).logits)
    again = build(small_config())
    with pytest.raises(OverlayError, match="differ from the rows it was made on"):  # the second alone: its row 7
        apply_overlays(again, [second])  # was made on the first's row 7, not the parent's


def test_overlays_that_do_not_belong_are_refused_by_name(tmp_path):
    model = build(small_config())
    _, overlay = edit(model, [1, 2])
    other_layout = build(small_config(engram=True)).layout.to_dict()
    other_layout["seed"] = 7
    del other_layout["fields_sha256"]  # as if saved so (an edited field with its checksum is refused anyway)
    moved = Overlay(other_layout, overlay.parent, overlay.rows, overlay.before_sha256)
    with pytest.raises(OverlayError, match="another hash layout.*seed"):
        apply_overlays(model, [moved])
    with pytest.raises(OverlayError, match="made on parent .*not on this model's step_9"):
        apply_overlays(model, [overlay], parent={"checkpoint": "step_9", "weights_sha256": "bb" * 32})
    overlay.save(tmp_path / "ov")
    manifest_path = tmp_path / "ov" / OVERLAY_JSON
    manifest = json.loads(manifest_path.read_text())
    manifest["before_sha256"][str(LAYER)].pop()  # a manifest that no longer describes its rows
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(OverlayError, match="the rows of layer 1 do not match"):
        Overlay.load(tmp_path / "ov")
    data = (tmp_path / "ov" / OVERLAY_ROWS).read_bytes()
    (tmp_path / "ov" / OVERLAY_ROWS).write_bytes(data[:-3])
    with pytest.raises(OverlayError, match="does not match the sha256"):
        Overlay.load(tmp_path / "ov")
    with pytest.raises(OverlayError, match="is not an overlay"):
        Overlay.load(tmp_path)
    with pytest.raises(OverlayError, match="sorted and unique"):
        OverlayTable(model.blocks[LAYER].engram.table, torch.tensor([4, 2]), torch.zeros(2, 8))
