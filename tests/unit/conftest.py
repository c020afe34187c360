"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os

import pytest

@pytest.fixture
def fsync_log(monkeypatch):
    """Record ('fsync', real path) and ('replace', src, dst) in call order (durable-write tests)."""
    log: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        log.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log
