"""Tables in a memory-mapped file (`DiskTable`): the on-disk format and its checksums.
Inference only: rows are plain tensors, not Parameters (no gradients); outputs equal an
`InMemoryTable`'s bit for bit (rows are gathered as a `HostTable` gathers them).

Disk format (version 2): a pair of files per table, `NAME.json` and `NAME.bin`.
    NAME.bin   the rows, row-major, [rows, dim] of `dtype`, little endian, no header.
    NAME.json  {"format": "engram-disk-table", "format_version": 2, "rows": int, "dim": int,
                "dtype": "float32" | "float16" | "bfloat16" | "float64" | "uint8",
                "table_sizes": [int, ...] (per-head sizes, in head order; they sum to rows),
                "byte_order": "little", "data_bytes": rows * dim * itemsize,
                "sha256": hex digest of NAME.bin,
                "block_rows": int, "block_crc32": 8 hex digits (big endian) per block of
                block_rows rows, in order (the last block may be shorter),
                "quantization": only for the packed rows of a quantized table (engram.memory.quantized),
                "header_sha256": sha256 of this header's other fields (canonical JSON)}
Version 1 is the same without the block fields. A header whose fields were changed after it was
written (a quantized kind edited by hand, say) no longer matches its header_sha256 and is
refused: the .bin's checksums cover the rows, this covers how they are read.

A served table checks each block's crc32 the first time a gather touches it, so a flipped byte
is an error, not a silent wrong row, and opening needs no full scan. Blocks are ~256 KiB
(BLOCK_BYTES): a first touch costs one 256 KiB crc32 (~0.1 ms at the ~3 GB/s zlib reaches),
close to one random disk read, while the header grows by 32 bytes per MiB of table (320 KB
for a 10 GiB table). crc32 catches every error burst up to 32 bits and any random corruption
with probability 1 - 2^-32; the threat is bit rot and torn copies, not an adversary, so a
cryptographic hash (2-5x slower here) buys nothing per block; sha256 still covers the whole
file for `open(verify=True)`.

Writing streams chunks into temporary files in the same folder (hashing as it goes), fsyncs
them, renames .bin and .json into place and fsyncs the folder; a crash in between leaves a
pair whose length or checksum disagrees, which `open` (length) or the block checks report.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sys
import tempfile
import threading
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from ..durable import file_sha256, fsync_dir, json_sha256
from .checkpoint_rows import CHUNK_BYTES, checkpoint_chunks
from .host import gather_rows
from .table import MemoryTable

def header_sha256(head: dict) -> str:
    """sha256 of a table header's fields other than header_sha256."""
    return json_sha256({k: v for k, v in head.items() if k != "header_sha256"})


FORMAT = "engram-disk-table"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
BLOCK_BYTES = 256 << 10  # rows are checksummed in blocks of about this size (see above)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "uint8": torch.uint8}  # uint8: the packed rows of a quantized table (engram.memory.quantized)


def table_paths(path_stem: str | os.PathLike) -> tuple[Path, Path]:
    """NAME -> (NAME.json, NAME.bin); a given .json or .bin suffix is dropped first."""
    stem = Path(path_stem)
    if stem.suffix in (".json", ".bin"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".bin")


def _sha256_file(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    return file_sha256(path, chunk_bytes)


class TableCorruptError(ValueError):
    """A table file whose bytes do not match the checksums written with it."""


class _BlockCrc:
    """Running crc32 of consecutive blocks of `block_bytes` over a byte stream cut anywhere."""

    def __init__(self, block_bytes: int) -> None:
        self.block_bytes, self.crcs, self._crc, self._filled = block_bytes, [], 0, 0

    def update(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), self.block_bytes - self._filled)
            self._crc, self._filled = zlib.crc32(data[:take], self._crc), self._filled + take
            data = data[take:]
            if self._filled == self.block_bytes:
                self.crcs.append(self._crc)
                self._crc, self._filled = 0, 0

    def hex(self) -> str:
        tail = [self._crc] if self._filled else []
        return b"".join(c.to_bytes(4, "big") for c in self.crcs + tail).hex()


class DiskTable(MemoryTable):
    """All heads in one memory-mapped file (see the module docstring for the format).

    Build with `DiskTable.write(...)` / `from_checkpoint(...)`, then `DiskTable.open(...)`.
    Each block of rows is checked against its crc32 on the first gather that touches it
    (a `TableCorruptError` names the file and block); `verified_blocks` counts them.
    Touched pages of the mapping count in this process's RSS (RssFile) until
    `release_pages()` (or automatically every `release_every` gathers) drops them; they stay
    in the kernel's page cache. `bytes_read` counts the row bytes gathered so far.
    """

    asynchronous = True  # a memory-mapped file: `prefetch` reads it in the background

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, rows_NE: torch.Tensor,
                 mapping: mmap.mmap | None, *, path: Path, device: torch.device | str | None = None,
                 release_every: int | None = None, block_rows: int | None = None,
                 block_crc: np.ndarray | None = None) -> None:
        """Use `DiskTable.open`; this takes an already mapped [rows, E] CPU tensor and, to check
        blocks on first touch, the rows per block and the expected crc32 of each block."""
        super().__init__(table_sizes, embedding_dim, device=device)
        if release_every is not None and release_every < 1:
            raise ValueError(f"release_every must be None or >= 1 gathers, got {release_every}")
        self.rows_NE, self._mapping, self.path = rows_NE, mapping, path
        self.release_every = release_every
        self.bytes_read = 0
        self._gathers = 0
        self._lock = threading.Lock()  # counters, block checks: the main thread and one prefetch thread
        self._block_rows, self._block_crc = block_rows, block_crc
        self._bytes_NB = None if block_crc is None else rows_NE.view(torch.uint8).numpy()  # [rows, row bytes], no copy
        n_blocks = 0 if block_crc is None else len(block_crc)
        self._verified = np.zeros(n_blocks, dtype=bool)  # bitmap: block checked (set once, never cleared)
        self._unverified = n_blocks

    @property
    def dtype(self) -> torch.dtype:
        return self.rows_NE.dtype

    @property
    def verified_blocks(self) -> int:
        """Blocks checked so far (0 when the table was opened without block checks)."""
        return len(self._verified) - self._unverified

    # ------------------------------------------------------------------ writing
    @staticmethod
    def write(path_stem: str | os.PathLike, weight_or_chunks: torch.Tensor | Iterable[torch.Tensor],
              table_sizes: Sequence[int], *, extra: dict | None = None) -> Path:
        """Write rows (one tensor [rows, E], or an iterable of [r_i, E] chunks in row order,
        so a huge table never has to be in memory at once). Returns the stem. `extra`: more
        header fields (a quantized table names its scheme and scales file there)."""
        json_path, bin_path = table_paths(path_stem)
        chunks = [weight_or_chunks] if isinstance(weight_or_chunks, torch.Tensor) else weight_or_chunks
        table_sizes = [int(s) for s in table_sizes]
        expect_rows = sum(table_sizes)
        bin_path.parent.mkdir(parents=True, exist_ok=True)
        h, rows, dim, dtype, crc = hashlib.sha256(), 0, None, None, None
        tmps = []
        try:
            fd, tmp_bin = tempfile.mkstemp(dir=bin_path.parent, prefix=f".{bin_path.name}.", suffix=".tmp")
            tmps.append(tmp_bin)
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    chunk = chunk.detach()
                    if dtype is None:
                        dtype, dim = chunk.dtype, (chunk.shape[-1] if chunk.dim() == 2 else None)
                    if chunk.dim() != 2 or chunk.shape[1] != dim or chunk.dtype != dtype:
                        raise ValueError(f"chunks must all be [rows, {dim}] of {dtype}, got "
                                         f"{chunk.dtype} of shape {tuple(chunk.shape)}")
                    if str(dtype).removeprefix("torch.") not in DTYPES:
                        raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
                    if crc is None:
                        block_rows = max(1, BLOCK_BYTES // (dim * dtype.itemsize))
                        crc = _BlockCrc(block_rows * dim * dtype.itemsize)
                    data = chunk.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                    h.update(data)
                    crc.update(memoryview(data))
                    f.write(data)
                    rows += chunk.shape[0]
                f.flush()
                os.fsync(f.fileno())
            if rows != expect_rows:
                raise ValueError(f"got {rows} rows, but table_sizes {table_sizes} sum to {expect_rows}")
            header = {"format": FORMAT, "format_version": FORMAT_VERSION, "rows": rows, "dim": dim,
                      "dtype": str(dtype).removeprefix("torch."), "table_sizes": table_sizes,
                      "byte_order": "little", "data_bytes": rows * dim * dtype.itemsize,
                      "sha256": h.hexdigest(), "block_rows": block_rows, "block_crc32": crc.hex(), **(extra or {})}
            header["header_sha256"] = header_sha256(header)
            fd, tmp_json = tempfile.mkstemp(dir=json_path.parent, prefix=f".{json_path.name}.", suffix=".tmp")
            tmps.append(tmp_json)
            with os.fdopen(fd, "w") as f:
                json.dump(header, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_bin, bin_path)
            os.replace(tmp_json, json_path)
            fsync_dir(json_path.parent)
        except BaseException:
            for tmp in tmps:
                Path(tmp).unlink(missing_ok=True)
            raise
        return json_path.with_suffix("")

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike, layer_id: int, out_stem: str | os.PathLike, *,
                        table_sizes: Sequence[int] | None = None, chunk_bytes: int = CHUNK_BYTES,
                        device: torch.device | str | None = None, release_every: int | None = None,
                        dtype: torch.dtype | None = None) -> "DiskTable":
        """Copy `blocks.{layer_id}.engram.table.weight` out of a model folder's model.safetensors
        in chunks of ~`chunk_bytes` (never the whole tensor at once), cast to `dtype` if given,
        and open the result. `table_sizes` default to the folder's hash_layout.json."""
        table_sizes, chunks = checkpoint_chunks(checkpoint_dir, layer_id, table_sizes, chunk_bytes)
        stem = cls.write(out_stem, (c if dtype is None else c.to(dtype) for c in chunks), table_sizes)
        return cls.open(stem, device=device, release_every=release_every)

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, path_stem: str | os.PathLike, device: torch.device | str | None = None, verify: bool = False,
             *, check_blocks: bool = True, release_every: int | None = None, packed: bool = False) -> "DiskTable":
        """Check the header against the .bin (length always) and map it.

        `check_blocks` (default): each block's crc32 is checked on its first touch, so opening
        reads nothing. `verify`: hash the whole file (sha256) now instead. A version-1 file has
        no block checksums: with `check_blocks` it is hashed whole now, with a warning.
        `check_blocks=False` and `verify=False` serve the bytes unchecked (the caller's risk).
        `packed`: open a quantized table's packed rows as raw bytes (for `QuantizedTable.open` only).
        """
        json_path, bin_path = table_paths(path_stem)
        for p in (json_path, bin_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} is missing; write the table with DiskTable.write or from_checkpoint")
        try:
            head = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path} is not valid JSON ({e}); rewrite the table") from None
        fix = "rewrite it with `engram offload` (DiskTable.write or DiskTable.from_checkpoint)"
        if head.get("format") != FORMAT or head.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{json_path}: format {head.get('format')!r} version {head.get('format_version')!r} "
                             f"is not supported (this engram-torch reads {FORMAT} versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}); {fix}")
        if head.get("quantization") and not packed:
            raise ValueError(f"{json_path} holds a quantized table ({head['quantization'].get('kind')}); "
                             "open it with engram.memory.quantized.QuantizedTable.open, which applies its scales")
        if head.get("dtype") not in DTYPES:
            raise ValueError(f"{json_path}: unknown dtype {head.get('dtype')!r} (known: {sorted(DTYPES)}); {fix}")
        if head.get("byte_order", "little") != sys.byteorder:
            raise ValueError(f"{json_path}: rows are {head.get('byte_order')} endian, this machine is {sys.byteorder}")
        if "header_sha256" in head and head["header_sha256"] != header_sha256(head):
            raise ValueError(f"{json_path}: its header was changed after it was written (its fields no longer match "
                             f"header_sha256); the rows would be read wrongly: {fix}")
        dtype, rows, dim = DTYPES[head["dtype"]], int(head["rows"]), int(head["dim"])
        table_sizes = [int(s) for s in head["table_sizes"]]
        expect = rows * dim * dtype.itemsize
        if sum(table_sizes) != rows or int(head["data_bytes"]) != expect:
            raise ValueError(f"{json_path}: header is inconsistent (rows {rows}, table_sizes sum "
                             f"{sum(table_sizes)}, data_bytes {head['data_bytes']} vs {expect}); {fix}")
        size = bin_path.stat().st_size
        if size != expect:
            raise ValueError(f"{bin_path} is {'shorter' if size < expect else 'longer'} than its header says "
                             f"({size} bytes, expected {expect}); it is truncated or belongs to another "
                             f"table: {fix}")
        block_rows, block_crc = None, None
        if check_blocks and not verify:
            if "block_crc32" not in head:
                warnings.warn(f"{json_path} has no block checksums (format version {head['format_version']}), so "
                              f"its whole file is hashed now, which is slow for big tables; {fix} to check "
                              "blocks on first touch instead", stacklevel=2)
                verify = True
            else:
                block_rows = int(head["block_rows"])
                block_crc = np.frombuffer(bytes.fromhex(head["block_crc32"]), dtype=">u4").astype(np.uint32)
                if block_rows < 1 or len(block_crc) != -(-rows // block_rows):
                    raise ValueError(f"{json_path}: {len(block_crc)} block checksums do not cover {rows} rows "
                                     f"in blocks of {block_rows}; {fix}")
        if verify and _sha256_file(bin_path) != head["sha256"]:
            raise TableCorruptError(f"{bin_path}: checksum (sha256) does not match {json_path}; the data is "
                                    f"corrupt: {fix}, or open with verify=False, check_blocks=False at your own risk")
        # Mode "r" maps the file read-only (PROT_READ, MAP_SHARED): nothing can ever write the
        # table file, and a stray in-place write faults instead of silently diverging from
        # the file (with mode "c" it would, and release_pages would then undo it). torch
        # warns that it cannot mark the tensor read-only; that warning alone is silenced.
        array = np.memmap(bin_path, dtype=np.uint8, mode="r", shape=(rows, dim * dtype.itemsize))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            rows_NE = torch.from_numpy(array).view(dtype)  # [rows, dim * itemsize] bytes -> [rows, dim]
        return cls(table_sizes, dim, rows_NE, getattr(array, "_mmap", None), path=bin_path, device=device,
                   release_every=release_every, block_rows=block_rows, block_crc=block_crc)

    def _check_blocks(self, idx: torch.Tensor) -> None:
        """crc32 every block that CPU row ids `idx` touch for the first time (thread-safe)."""
        if self._unverified == 0:
            return
        blocks = idx.numpy() // self._block_rows
        todo = np.unique(blocks[~self._verified[blocks]])
        if todo.size == 0:
            return
        with self._lock:
            for b in todo.tolist():
                if self._verified[b]:  # another thread checked it meanwhile
                    continue
                start = b * self._block_rows
                stop = min(start + self._block_rows, self.num_rows)
                if zlib.crc32(self._bytes_NB[start:stop]) != int(self._block_crc[b]):
                    raise TableCorruptError(
                        f"{self.path}: block {b} (rows {start}..{stop - 1}) does not match its crc32 in "
                        f"{self.path.with_suffix('.json')}; the table file is corrupt: re-run `engram offload` "
                        "(or DiskTable.from_checkpoint) to rewrite it")
                self._verified[b] = True
                self._unverified -= 1

    def check_all_blocks(self) -> None:
        """crc32 every block not checked yet, now: what a server does at start, so that a
        corrupt file is refused before it serves anything (~3 GB/s, page cache released as it goes)."""
        if self._block_crc is None or self._unverified == 0:
            return
        step = self._block_rows * 256
        for start in range(0, self.num_rows, step):
            self._check_blocks(torch.arange(start, min(start + step, self.num_rows), self._block_rows))
            self.release_pages()

    # With release_every=1 a gather reads this many ids between releases: each page fault maps
    # up to 16 neighbouring cached pages (the kernel's fault-around), so one big gather could
    # otherwise map a large part of the file before its release.
    RELEASE_CHUNK = 2048

    def gather(self, flat_ids: torch.Tensor) -> torch.Tensor:
        idx = flat_ids.reshape(-1).to("cpu", torch.long)
        if self.release_every == 1 and idx.numel() > self.RELEASE_CHUNK:
            parts = []
            for start in range(0, idx.numel(), self.RELEASE_CHUNK):
                part = idx[start:start + self.RELEASE_CHUNK]
                self._check_blocks(part)
                parts.append(gather_rows(self.rows_NE, part, self.offsets.device))
                self.release_pages()
            out = torch.cat(parts)
        else:
            self._check_blocks(idx)
            out = gather_rows(self.rows_NE, idx, self.offsets.device)
        out = out.view(*flat_ids.shape, self.embedding_dim)
        with self._lock:
            self.bytes_read += flat_ids.numel() * self.embedding_dim * self.rows_NE.dtype.itemsize
            self._gathers += 1
            due = self.release_every is not None and self._gathers % self.release_every == 0
        if due:
            self.release_pages()
        return out

    def release_pages(self) -> bool:
        """Unmap the touched pages from this process (madvise MADV_DONTNEED): RssFile falls
        back, the page cache keeps the (clean, read-only) data, later reads fault it back in.
        Returns False where madvise is unavailable (non-Linux)."""
        if self._mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
            return False
        with self._lock:
            self._mapping.madvise(mmap.MADV_DONTNEED)
        return True

    def extra_repr(self) -> str:
        return (f"path={str(self.path)!r}, heads={len(self.table_sizes)}, rows={self.num_rows}, "
                f"dim={self.embedding_dim}, dtype={self.rows_NE.dtype}, release_every={self.release_every}")
