"""Fault injection for the "nothing lost" tests: a disk that fills up.

`small_disk(path, kib)` mounts a tmpfs of that size at `path` where the machine allows it (as
root), so a command really meets ENOSPC from the kernel; elsewhere it yields `path` on the
normal disk with `engram.durable.fsync_tree` (every staged folder passes it before its rename)
raising ENOSPC. Either way the command under test fails the way a full disk makes it fail, and
is checked to leave no partial output.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from unittest import mock


@contextlib.contextmanager
def small_disk(path: Path, kib: int = 256):
    """Yield (`path`, "tmpfs" or "simulated"): a folder where writes run out of space."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True).returncode == 0
    if mounted:
        try:
            yield path, "tmpfs"
        finally:
            subprocess.run(["umount", "-l", str(path)], check=False)
        return

    def full(tmp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with mock.patch("engram.durable.fsync_tree", full):
        yield path, "simulated"
