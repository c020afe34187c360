"""Quantized tables: int8/fp8 codes with absmax scales, per row or per 32 values; error bounds,
exact agreement between the resident and the disk form, and corruption caught on first touch."""

import json

import pytest
import torch

from engram.memory.disk_format import DiskTable, TableCorruptError
from engram.memory.quantized import QuantizedTable, dequantize, quantize_rows
from engram.memory import InMemoryTable

SIZES = [53, 61, 47]


def rows(seed=0, E=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(sum(SIZES), E, generator=g)
    w[5] = 0  # an all-zero row
    w[7, 3] = 40.0  # an outlier: per-32 scales should isolate it
    return w


def test_int8_codes_and_error_bound():
    w = rows()
    codes, scales = quantize_rows(w, "int8")
    assert codes.dtype == torch.int8 and scales.shape == (w.shape[0], 1)
    assert int(codes.abs().max()) == 127  # each row's absmax maps to the top code
    back = dequantize(codes, scales)
    assert torch.all((back - w).abs() <= scales / 2 + 1e-7)  # round to nearest: half a step at most
    assert torch.equal(back[5], torch.zeros(64))


def test_fp8_matches_torch_e4m3_rounding_and_relative_bound():
    w = rows()
    codes, scales = quantize_rows(w, "fp8", group=32)
    assert codes.dtype == torch.float8_e4m3fn and scales.shape == (w.shape[0], 2)
    scaled = w.reshape(-1, 2, 32) / scales.unsqueeze(-1)
    assert torch.equal(codes.reshape(-1, 2, 32).float(), scaled.to(torch.float8_e4m3fn).float())
    back = dequantize(codes, scales)
    # the integer-op conversion equals torch's own fp8 -> float32, subnormals and signs included
    assert torch.equal(back, (codes.float().reshape(-1, 2, 32) * scales.unsqueeze(-1)).reshape(w.shape))
    every_code = torch.arange(256, dtype=torch.uint8)
    every_code = every_code[(every_code & 0x7F) != 0x7F].view(torch.float8_e4m3fn)  # all but the two NaNs
    assert torch.equal(dequantize(every_code[None], torch.ones(1, 1)), every_code.float()[None])
    normal = scaled.abs().reshape(w.shape) >= 2.0 ** -6  # e4m3's smallest normal
    rel = ((back - w).abs() / w.abs().clamp_min(1e-30))[normal]
    assert float(rel.max()) <= 2.0 ** -4


def test_per_32_scales_keep_an_outlier_from_flattening_its_row():
    w = rows()
    err_row = (dequantize(*quantize_rows(w, "int8")) - w)[7].abs().max()
    err_32 = (dequantize(*quantize_rows(w, "int8", group=32)) - w)[7, 32:].abs().max()  # the half without it
    assert err_32 < err_row / 10


@pytest.mark.parametrize("kind, group", [("int8", None), ("int8", 32), ("fp8", None), ("fp8", 32)])
def test_resident_and_disk_tables_gather_the_same_dequantized_rows(tmp_path, kind, group):
    w = rows()
    dense = InMemoryTable(SIZES, 64)
    with torch.no_grad():
        dense.weight.copy_(w)
    resident = QuantizedTable.quantize(w, SIZES, kind, group)
    QuantizedTable.write(tmp_path / "t", w, SIZES, kind, group)
    disk = QuantizedTable.open(tmp_path / "t")
    ids = torch.tensor([[[0, 0, 0], [52, 60, 46], [5, 7, 11]]])
    a, b = resident(ids), disk(ids)
    assert torch.equal(a, b)
    tol = 0.07 if kind == "fp8" else 0.03  # relative to the row's absmax (fp8: 2^-4; int8: 1/254)
    assert torch.allclose(a, dense(ids), atol=tol * float(w.abs().max()))
    header = json.loads((tmp_path / "t.json").read_text())
    assert header["quantization"] == {"kind": kind, "group": group, "dim": 64} and header["dtype"] == "uint8"
    expect = w.shape[0] * (64 + 4 * (64 // (group or 64)))  # 1-byte codes + float32 scales
    assert disk.nbytes == expect and resident.nbytes == expect


def test_codes_are_not_served_as_floats_and_corruption_is_caught(tmp_path):
    w = rows()
    QuantizedTable.write(tmp_path / "t", w, SIZES, "int8")
    with pytest.raises(ValueError, match="QuantizedTable.open"):
        DiskTable.open(tmp_path / "t")
    raw = bytearray((tmp_path / "t.bin").read_bytes())
    raw[64 + 2] ^= 0x40  # a byte of the first row's scale
    (tmp_path / "t.bin").write_bytes(bytes(raw))
    table = QuantizedTable.open(tmp_path / "t")
    with pytest.raises(TableCorruptError, match="crc32"):
        table(torch.tensor([[[0, 0, 0]]]))
    with pytest.raises(ValueError, match="must divide"):
        quantize_rows(w, "int8", group=48)
    with pytest.raises(ValueError, match="one of"):
        quantize_rows(w, "int4")


def test_a_model_moves_and_casts_around_its_quantized_codes():
    q = QuantizedTable.quantize(rows(), SIZES, "int8")
    ids = torch.tensor([[[3, 9, 1]]])
    before = q(ids)
    q.to(torch.bfloat16).float()
    assert q.packed.dtype == torch.uint8 and torch.equal(q(ids), before)


def test_an_edited_header_and_an_unknown_kind_are_refused(tmp_path):
    """A header edited to another kind would read int8 codes as fp8 (a wrong loss, no error):
    its header checksum no longer matches. The constructor checks its kind and group."""
    QuantizedTable.write(tmp_path / "t", rows(), SIZES, "int8")
    head = json.loads((tmp_path / "t.json").read_text())
    head["quantization"]["kind"] = "fp8"
    (tmp_path / "t.json").write_text(json.dumps(head))
    with pytest.raises(ValueError, match="header was changed after it was written"):
        QuantizedTable.open(tmp_path / "t")
    packed = QuantizedTable.quantize(rows(), SIZES, "int8").packed
    with pytest.raises(ValueError, match="quantized kind must be one of"):
        QuantizedTable(SIZES, 64, packed, "int4", None)
    with pytest.raises(ValueError, match="group 48 must divide"):
        QuantizedTable(SIZES, 64, packed, "int8", 48)
