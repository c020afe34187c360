"""HostTable and DiskTable: same rows as InMemoryTable, checkpoint conversion, header checks, RSS."""

import dataclasses
import gc
import json
import sys
import threading
import warnings

import pytest
import torch

from engram import Engram, EngramConfig, EngramLM, InMemoryTable, NgramHasher, presets, save_model
from engram.memory import convert_checkpoint_tables, disk_format
from engram.memory import host as host_module
from engram.memory.disk_format import DiskTable, TableCorruptError
from engram.memory.host import HostTable


def n01_rows(config):
    """`config` with N(0, 1) table rows: a checkpoint whose rows are worth comparing (not all zero)."""
    return dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=1.0))

SIZES = (53, 59, 61, 67)  # four heads
E = 8


def in_memory(dtype, sizes=SIZES, dim=E):
    table = InMemoryTable(sizes, dim, dtype=dtype)
    with torch.no_grad():
        table.weight.normal_()
    return table


def offloaded(kind, table, tmp_path):
    if kind == "host":
        return HostTable.from_table(table)
    stem = DiskTable.write(tmp_path / "table", table.weight, table.table_sizes)
    return DiskTable.open(stem)


def random_rows(sizes, B=3, T=11):
    return torch.stack([torch.randint(0, s, (B, T)) for s in sizes], dim=-1)  # [B, T, H]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["host", "disk"])
def test_rows_are_bit_identical_to_in_memory(kind, dtype, tmp_path, rng):
    ref = in_memory(dtype)
    table = offloaded(kind, ref, tmp_path)
    rows = random_rows(SIZES)
    want, got = ref(rows), table(rows)
    assert got.dtype == dtype and got.shape == (3, 11, len(SIZES), E)
    assert torch.equal(got, want), f"max difference {(got.float() - want.float()).abs().max()}"
    assert list(table.parameters()) == [] and "weight" not in table.state_dict()  # inference only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["host", "disk"])
def test_engram_module_output_is_bit_identical(kind, dtype, tmp_path, rng):
    cfg = EngramConfig(compressed_vocab_size=97, pad_id=0, layer_ids=(1,), rows_per_head=(53, 61),
                       max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8, conv_zero_init=False)
    hasher = NgramHasher.from_config(cfg)
    sizes = hasher.table_sizes[1]
    ref = Engram(cfg, sizes, hidden_size=16, n_streams=4, layer_id=1, table=in_memory(dtype, sizes, cfg.row_dim))
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    other = Engram(cfg, sizes, hidden_size=16, n_streams=4, layer_id=1, table=offloaded(kind, ref.table, tmp_path))
    # everything but the table (which is not a parameter of a host/disk table)
    other.load_state_dict({k: v for k, v in ref.state_dict().items() if k != "table.weight"})
    ids = torch.randint(0, cfg.compressed_vocab_size, (2, 13))
    hidden = torch.randn(2, 13, 4, 16)
    rows = hasher.hash(ids)[1]
    want, got = ref(hidden, rows), other(hidden, rows)
    assert torch.equal(got, want), f"max difference {(got - want).abs().max()}"


def test_write_from_chunks_equals_write_from_tensor(tmp_path):
    weight = torch.randn(sum(SIZES), E)
    a = DiskTable.write(tmp_path / "whole", weight, SIZES)
    b = DiskTable.write(tmp_path / "chunks", iter(weight.split(17)), SIZES)
    ha, hb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("whole", "chunks"))
    assert ha == hb and ha["rows"] == sum(SIZES) and ha["table_sizes"] == list(SIZES)
    assert torch.equal(DiskTable.open(a).rows_NE, DiskTable.open(b).rows_NE)
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"
    with pytest.raises(ValueError, match="sum to"):
        DiskTable.write(tmp_path / "short", weight[:-1], SIZES)
    assert not (tmp_path / "short.json").exists() and not list(tmp_path.glob(".*.tmp"))


def test_bytes_read_and_two_threads(tmp_path):
    ref = in_memory(torch.float32)
    table = offloaded("disk", ref, tmp_path)
    rows = [random_rows(SIZES) for _ in range(40)]
    results = [None] * len(rows)

    def work(start):
        for i in range(start, len(rows), 2):
            results[i] = table(rows[i])

    threads = [threading.Thread(target=work, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got, ref(r)) for got, r in zip(results, rows))
    assert table.bytes_read == sum(r.numel() for r in rows) * E * 4


def test_from_checkpoint_streams_and_matches_the_model(tmp_path, monkeypatch):
    model = EngramLM(n01_rows(presets.tiny()))
    save_model(model, tmp_path / "ckpt")
    weight = model.blocks[1].engram.table.weight.detach()
    chunk_rows = []
    write = DiskTable.write

    def spy(stem, chunks, sizes):
        def counted():
            for c in chunks:
                chunk_rows.append(c.shape[0])
                yield c
        return write(stem, counted(), sizes)

    monkeypatch.setattr(DiskTable, "write", staticmethod(spy))
    disk = DiskTable.from_checkpoint(tmp_path / "ckpt", 1, tmp_path / "out" / "layer1",
                                     chunk_bytes=1000 * weight.shape[1] * weight.element_size())
    assert max(chunk_rows) == 1000 and len(chunk_rows) == -(-weight.shape[0] // 1000), \
        "the conversion must read the table in chunks, never whole"
    assert sum(chunk_rows) == weight.shape[0]
    assert disk.table_sizes == model.blocks[1].engram.table.table_sizes
    assert torch.equal(disk.rows_NE, weight)

    # the converted table in place of the model's gives the same logits
    monkeypatch.undo()
    stems = convert_checkpoint_tables(tmp_path / "ckpt", tmp_path / "all")
    assert list(stems) == [1]
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = model(ids).logits
        model.blocks[1].engram.table = DiskTable.open(stems[1])
        got = model(ids).logits
    assert torch.equal(got, want)


def test_header_checks(tmp_path):
    stem = DiskTable.write(tmp_path / "t", torch.randn(sum(SIZES), E), SIZES)
    bin_path, json_path = tmp_path / "t.bin", tmp_path / "t.json"
    good_bin, good_json = bin_path.read_bytes(), json_path.read_text()

    bin_path.write_bytes(good_bin[:-5])
    with pytest.raises(ValueError, match="shorter"):
        DiskTable.open(stem)
    bin_path.write_bytes(good_bin + b"\0")
    with pytest.raises(ValueError, match="longer"):
        DiskTable.open(stem)

    flipped = bytearray(good_bin)
    flipped[len(flipped) // 2] ^= 0x01
    bin_path.write_bytes(bytes(flipped))
    with pytest.raises(TableCorruptError, match="sha256"):
        DiskTable.open(stem, verify=True)  # the whole file, now
    unchecked = DiskTable.open(stem, check_blocks=False)  # the caller's choice: no checksum, same length
    unchecked.gather(torch.arange(sum(SIZES)))
    bin_path.write_bytes(good_bin)

    for field, value, message in [("format_version", 99, "version"), ("dtype", "float7", "dtype")]:
        json_path.write_text(json.dumps({**json.loads(good_json), field: value}))
        with pytest.raises(ValueError, match=message):
            DiskTable.open(stem)
    json_path.write_text(good_json)
    DiskTable.open(stem)


def _rss_file_kb():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in ("RssFile", "RssShmem") if k in fields)  # tmpfs: RssShmem


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status, madvise")
def test_release_pages_bounds_resident_memory(tmp_path):
    dim, rows, step = 64, 800 * 1024, 40 * 1024  # 800k rows x 256 bytes = 200 MiB
    chunks = (torch.full((step, dim), float(i)) for i in range(rows // step))
    stem = DiskTable.write(tmp_path / "big", chunks, [rows])

    def read_all(table):
        for start in range(0, rows, step):
            table.gather(torch.arange(start, start + step))

    table = DiskTable.open(stem, verify=False)
    before = _rss_file_kb()
    read_all(table)
    added = _rss_file_kb() - before
    assert added > 150 * 1024, f"reading 200 MiB added only {added} kB of RssFile"
    assert table.release_pages()
    dropped = before + added - _rss_file_kb()
    assert dropped >= added / 2, f"release_pages dropped {dropped} kB of the {added} kB reading added"
    assert table.bytes_read == rows * dim * 4

    auto = DiskTable.open(stem, verify=False, release_every=1)  # released after every gather
    before = _rss_file_kb()
    read_all(auto)
    assert _rss_file_kb() - before < added / 4
    assert torch.equal(auto.gather(torch.tensor([step * 3])), torch.full((1, dim), 3.0))


def test_release_every_gather_reads_in_chunks_with_identical_rows(tmp_path):
    weight = torch.randn(5000, 8)
    stem = DiskTable.write(tmp_path / "t", weight, [2500, 2500])
    table = DiskTable.open(stem, release_every=1)
    ids = torch.randint(0, 5000, (3, DiskTable.RELEASE_CHUNK))  # several chunks
    assert torch.equal(table.gather(ids), weight[ids])


# ---------------------------------------------------------------- block checksums (issue 10)
def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_block_checksums_catch_a_flipped_byte_on_first_touch_without_a_full_scan(tmp_path, monkeypatch):
    dim, rows = 64, 10_000  # 256-byte rows: 1024 rows per 256 KiB block, 10 blocks
    weight = torch.randn(rows, dim)
    stem = DiskTable.write(tmp_path / "t", iter(weight.split(777)), [rows // 2, rows // 2])  # chunks cut blocks
    head = json.loads((tmp_path / "t.json").read_text())
    block_rows = head["block_rows"]
    assert block_rows == disk_format.BLOCK_BYTES // (dim * 4) == 1024 and len(head["block_crc32"]) == 8 * 10
    bad_block, bad_row = 3, 3 * 1024 + 17
    _flip(tmp_path / "t.bin", bad_row * dim * 4 + 5)

    hashed = []
    monkeypatch.setattr(disk_format, "_sha256_file", lambda *a, **k: hashed.append(a) or "x")
    table = DiskTable.open(stem)  # the CLI's --tables path passes verify=False: same checks
    assert hashed == [], "open must not hash the whole file"
    assert table.verified_blocks == 0

    ok = torch.tensor([0, 1023, 1024 * 5 + 3, rows - 1])  # blocks 0, 5, 9
    assert torch.equal(table.gather(ok), weight[ok])
    assert table.verified_blocks == 3
    assert torch.equal(table.gather(ok), weight[ok])  # checked once: no new blocks
    assert table.verified_blocks == 3
    with pytest.raises(TableCorruptError, match=rf"t\.bin: block {bad_block} \(rows 3072\.\.4095\).*engram offload"):
        table.gather(torch.tensor([[2 * block_rows, bad_block * block_rows]]))  # any row of the bad block
    assert table.verified_blocks == 4  # block 2 checked before the bad one; block 3 never marked good
    with pytest.raises(TableCorruptError):  # through forward (head 0 holds rows 0..4999)
        table(torch.tensor([[[bad_row, 0]]]))
    assert torch.equal(table.gather(torch.tensor([4096])), weight[4096:4097])  # block 4 still fine

    chunked = DiskTable.open(stem, release_every=1)  # the chunked gather path checks too
    ids = torch.arange(0, rows, 2)
    assert ids.numel() > DiskTable.RELEASE_CHUNK
    with pytest.raises(TableCorruptError, match=f"block {bad_block}"):
        chunked.gather(ids)


def test_block_checks_are_thread_safe_and_cover_every_block(tmp_path):
    weight = torch.randn(9000, 128)  # 512-byte rows: 512 rows per block, 18 blocks (last one short)
    table = DiskTable.open(DiskTable.write(tmp_path / "t", weight, [9000]))
    n_blocks = -(-9000 // 512)
    errors, results = [], {}

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        try:
            for i in range(30):
                ids = torch.randint(0, 9000, (64,), generator=g)
                results[seed, i] = torch.equal(table.gather(ids), weight[ids])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results.values())
    table.gather(torch.arange(9000))
    assert table.verified_blocks == n_blocks and table._unverified == 0


def test_version_1_tables_without_block_checksums_are_hashed_whole_with_a_warning(tmp_path):
    weight = torch.randn(sum(SIZES), E)
    stem = DiskTable.write(tmp_path / "t", weight, SIZES)
    head = json.loads((tmp_path / "t.json").read_text())
    for key in ("block_rows", "block_crc32", "header_sha256"):  # version 1 had none of them
        del head[key]
    (tmp_path / "t.json").write_text(json.dumps({**head, "format_version": 1}))
    with pytest.warns(UserWarning, match="no block checksums.*engram offload"):
        table = DiskTable.open(stem)
    assert torch.equal(table.gather(torch.arange(sum(SIZES))), weight)
    _flip(tmp_path / "t.bin", 7)
    with pytest.warns(UserWarning, match="no block checksums"), pytest.raises(TableCorruptError, match="sha256"):
        DiskTable.open(stem)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DiskTable.open(stem, check_blocks=False)  # explicitly unchecked: no warning, no error


# ---------------------------------------------------------------- host tables: one copy only (issue 10)
def test_host_table_uses_a_cpu_source_in_place():
    ref = in_memory(torch.float32)
    host = HostTable.from_table(ref, pin=False)
    assert host.weight.data_ptr() == ref.weight.data_ptr(), "a contiguous CPU source must not be copied"
    rows = random_rows(SIZES)
    assert torch.equal(host(rows), ref(rows))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin=True needs CUDA"):
            HostTable.from_table(ref, pin=True)


def test_host_table_copies_other_sources_in_slices(monkeypatch):
    weight = torch.randn(2 * sum(SIZES), E)[::2]  # strided: must be copied, in slices
    slices = []
    real = host_module._copy_in_slices

    def spy(dst, read, chunk_bytes):
        return real(dst, lambda a, b: slices.append((a, b)) or read(a, b), chunk_bytes)

    monkeypatch.setattr(host_module, "_copy_in_slices", spy)
    host = HostTable(SIZES, E, weight, pin=False, chunk_bytes=50 * E * 4)
    assert host.weight.is_contiguous() and torch.equal(host.weight, weight)
    assert slices == [(a, min(a + 50, sum(SIZES))) for a in range(0, sum(SIZES), 50)]


def test_host_table_from_checkpoint_reads_in_slices(tmp_path, monkeypatch):
    model = EngramLM(n01_rows(presets.tiny()))
    save_model(model, tmp_path / "ckpt")
    weight = model.blocks[1].engram.table.weight.detach()
    slices = []
    real = host_module._copy_in_slices
    monkeypatch.setattr(host_module, "_copy_in_slices", lambda dst, read, chunk_bytes: real(
        dst, lambda a, b: slices.append(b - a) or read(a, b), chunk_bytes))
    host = HostTable.from_checkpoint(tmp_path / "ckpt", 1, pin=False, chunk_bytes=1000 * weight[0].nbytes)
    assert max(slices) == 1000 and sum(slices) == weight.shape[0], "the table must be read in slices"
    assert torch.equal(host.weight, weight)
    assert host.table_sizes == model.blocks[1].engram.table.table_sizes


class _FakeCudart:
    def __init__(self):
        self.calls = []

    def cudaHostRegister(self, ptr, nbytes, flags):
        self.calls.append(("register", ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr):
        self.calls.append(("unregister", ptr))
        return 0


def test_host_table_pins_in_place_and_unpins_when_dropped(monkeypatch):
    """The pinned path on a CPU-only machine: cudaHostRegister on the one host copy, no second."""
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    ref = in_memory(torch.float32)
    host = HostTable.from_table(ref)
    ptr = ref.weight.data_ptr()
    assert host.pinned and host.weight.data_ptr() == ptr
    assert cudart.calls == [("register", ptr, ref.weight.nbytes)]
    del host
    gc.collect()
    assert cudart.calls[-1] == ("unregister", ptr)
