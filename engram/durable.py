"""Writes that survive a crash or a power cut: write a temporary file, fsync it, rename it into
place, fsync the folder.

A rename is atomic, but without the fsyncs the kernel may reorder the writes, so after a power
cut the new name can point at an empty or half-written file. Order that makes it durable: the
data of every file, then the folder holding them (the new names), then the rename, then the
parent folder (the rename itself).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read `chunk_bytes` at a time into one reused buffer
    (checksums of what was written: checkpoints, table files, overlays)."""
    h, buf = hashlib.sha256(), bytearray(chunk_bytes)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(memoryview(buf)[:n])
    return h.hexdigest()


def json_sha256(fields: dict) -> str:
    """sha256 of a JSON object's canonical text (sorted keys, no spaces): what a header or a
    layout stores of its own fields, so an edit made after writing is caught."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush one file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (names created, renamed or deleted in it) to the disk."""
    if os.name == "nt":  # Windows cannot open a folder for fsync; NTFS journals its metadata
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under a folder, then each folder bottom up (the folder itself last)."""
    path = Path(path)
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(root)


def replace_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make a finished temporary folder durable and rename it to `final`.

    Every file of `tmp` and `tmp` itself are fsynced before the rename, the parent after it.
    An existing `final` is moved aside to `.NAME.old` first and deleted once the new folder is
    in place (a folder cannot be renamed over a non-empty one).
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike):
    """`with staged_dir(final) as tmp:` write a folder's files into `tmp` (beside `final`); on
    leaving the block it is made durable and renamed to `final` (`replace_dir`), or, on an
    error, removed, so `final` is never half-written."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Replace `path` with `data` so a reader sees the old content or the new, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` for text."""
    return atomic_write_bytes(path, text.encode(encoding))


def read_safetensors(path: str | os.PathLike, numpy: bool = False) -> dict:
    """The tensors (or with `numpy`, arrays) of a safetensors file; a missing, truncated or
    corrupt one is a ValueError that names it (safetensors raises its own error types)."""
    from safetensors import SafetensorError

    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} cannot be read ({e}); the file is missing, truncated or corrupt") from None
