"""engram.durable: every file and folder is fsynced before the rename, the parent after it."""

from __future__ import annotations

import os

import pytest
import torch

from engram import durable

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced fds via /proc")


def test_atomic_write_text_fsyncs_file_then_renames_then_fsyncs_parent(tmp_path, fsync_log):
    target = tmp_path / "summary.json"
    target.write_text("old")
    durable.atomic_write_text(target, '{"a": 1}')
    assert target.read_text() == '{"a": 1}'
    assert [e[0] for e in fsync_log] == ["fsync", "replace", "fsync"]
    assert fsync_log[0][1] == fsync_log[1][1]  # the temporary file's data is flushed before the rename
    assert fsync_log[1][2] == str(target.resolve())
    assert fsync_log[2][1] == str(tmp_path.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left


def test_atomic_write_leaves_old_content_and_no_temp_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    target.write_text("old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        durable.atomic_write_bytes(target, b"new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_replace_dir_fsyncs_every_file_and_folder_before_the_rename(tmp_path, fsync_log):
    tmp = tmp_path / ".ckpt.tmp"
    (tmp / "sub").mkdir(parents=True)
    files = [tmp / "a.bin", tmp / "b.json", tmp / "sub" / "c.txt"]
    for f in files:
        f.write_bytes(os.urandom(16))
    final = tmp_path / "ckpt"
    durable.replace_dir(tmp, final)
    kinds = [e[0] for e in fsync_log]
    assert kinds.count("replace") == 1
    cut = kinds.index("replace")
    before = {e[1] for e in fsync_log[:cut]}
    expect = {str(f.resolve()) for f in files} | {str(tmp.resolve()), str((tmp / "sub").resolve())}
    assert before == expect, f"fsynced before rename: {before ^ expect} differ"
    # the folder itself is flushed after its files
    assert fsync_log[cut - 1][1] == str(tmp.resolve())
    assert fsync_log[cut + 1:] == [("fsync", str(tmp_path.resolve()))]
    assert (final / "sub" / "c.txt").is_file() and not tmp.exists()


def test_a_truncated_safetensors_file_is_a_value_error_naming_it(tmp_path):
    from safetensors.torch import save_file

    from engram.durable import read_safetensors

    path = tmp_path / "t.safetensors"
    save_file({"x": torch.arange(100.0)}, str(path))
    assert torch.equal(read_safetensors(path)["x"], torch.arange(100.0))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match=f"{path} cannot be read.*truncated"):
        read_safetensors(path)
    with pytest.raises(ValueError, match="missing"):
        read_safetensors(tmp_path / "absent.safetensors")
