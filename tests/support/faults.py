"""Disk faults injected where plugboard writes module bytes: os.pwrite (registry._files.write_at)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path


class DiskFills:
    """Stands in for os.pwrite: files under `root` get `budget` bytes in all, then the disk is "full".

    Like a real full disk: the write that crosses the budget writes what fits and returns a short
    count; the next one raises OSError(ENOSPC) (or the errno given, e.g. EDQUOT or EIO). Writes to
    files elsewhere go through untouched. Install with monkeypatch.setattr(os, "pwrite", DiskFills(...)).
    """

    def __init__(self, root: Path, budget: int = 0, err: int = errno.ENOSPC) -> None:
        self.root = str(Path(root).resolve())
        self.left = budget
        self.err = err
        self.written = 0
        self.refused = 0
        self._real = os.pwrite
        self._lock = threading.Lock()

    def __call__(self, fd: int, data: bytes | memoryview, offset: int) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self.root + os.sep):
            return self._real(fd, data, offset)
        with self._lock:
            if self.left <= 0:
                self.refused += 1
                raise OSError(self.err, os.strerror(self.err))
            n = min(len(data), self.left)
            self.left -= n
            self.written += n
        return self._real(fd, memoryview(data)[:n], offset)
