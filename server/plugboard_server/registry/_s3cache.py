"""Versions downloaded from an object store, kept on local disk: <root>/versions/<name>/<version>/.

A version is downloaded into <root>/tmp/, checked against the registry's checksums, then renamed
into place, so a directory under versions/ always holds a whole, verified version; it is checked
again on every read, as a directory registry's files are. Versions are immutable, so a cached one
never goes stale; when the cache outgrows its budget, the least recently used versions leave
(never one used in the last minute: a reader may be between its check and its read).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from plugboard_server.errors import AdapterNotFound, CorruptModule
from plugboard_server.metrics import Metrics
from plugboard_server.registry._files import (
    alive,
    digest,
    remove,
    scratch_dir,
    scratch_owner,
    storage_errors,
)
from plugboard_server.registry.store import AdapterRef

log = logging.getLogger(__name__)

RECENT_S = 60.0  # a version used this recently is never evicted


class VersionCache:
    """A size-bounded local cache of module versions, shared safely by threads and processes."""

    def __init__(self, root: Path, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.root = Path(root)
        self._metrics = metrics
        self.versions_root = self.root / "versions"
        self.tmp_root = self.root / "tmp"
        self.max_bytes = max_bytes
        self._host = socket.gethostname()
        self._lock = threading.Lock()
        self._key_locks: dict[str, threading.Lock] = {}
        with storage_errors(self.root):
            self.versions_root.mkdir(parents=True, exist_ok=True)
            self.tmp_root.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()

    def path(self, name: str, version: int) -> Path:
        return self.versions_root / name / str(version)

    def get(self, ref: AdapterRef, download: Callable[[str, Path], None]) -> Path:
        """The version's verified directory; `download(filename, target)` fetches a missing one's files.

        Raises CorruptModule when a downloaded file differs from its recorded checksum.
        """
        target = self.path(ref.name, ref.version)
        with self._key_lock(ref.key):
            if target.is_dir():
                try:
                    self._verify(ref, target)
                    os.utime(target)  # recently used: evicted last
                    return target
                except (CorruptModule, OSError) as e:
                    log.warning("cached %s is damaged (%s); downloading it again", ref.key, e)
                    remove(target)
            start = time.perf_counter()
            try:
                size = self._download(ref, target, download)
            except AdapterNotFound:
                self._count("deleted")
                raise
            except CorruptModule:
                self._count("corrupt")
                raise
            except Exception:
                self._count("error")
                raise
            self._count("ok", size, time.perf_counter() - start)
            log.info(
                "downloaded %s (%d files, %d bytes) in %.3fs",
                ref.key,
                len(ref.sha256),
                size,
                time.perf_counter() - start,
            )
        self._evict(keep=target)
        return target

    def drop(self, name: str, version: int) -> None:
        """Forget a version deleted from the registry."""
        remove(self.path(name, version))

    # -- helpers ---------------------------------------------------------------------------------

    def _count(self, outcome: str, size: int = 0, seconds: float | None = None) -> None:
        if self._metrics is None:
            return
        self._metrics.registry_downloads.labels(outcome).inc()
        if seconds is not None:
            self._metrics.registry_download_bytes.inc(size)
            self._metrics.registry_download_seconds.observe(seconds)

    def _key_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._key_locks.setdefault(key, threading.Lock())

    def _download(self, ref: AdapterRef, target: Path, download: Callable[[str, Path], None]) -> int:
        size = 0
        with storage_errors(self.root), scratch_dir(self.tmp_root, self._host, self.root) as tmp:
            for filename, expected in ref.sha256:
                download(filename, tmp / filename)
                actual, n = digest(tmp / filename)
                size += n
                if actual != expected:
                    raise CorruptModule(
                        f"checksum mismatch: {filename} of {ref.key} downloaded with sha256 "
                        f"{actual[:16]}…, the registry recorded {expected[:16]}…"
                    )
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not another process's copy of the same version
                    raise
        return size

    @staticmethod
    def _verify(ref: AdapterRef, path: Path) -> None:
        for filename, expected in ref.sha256:
            actual, _ = digest(path / filename)
            if actual != expected:
                raise CorruptModule(f"{filename} has sha256 {actual[:16]}…, expected {expected[:16]}…")

    def _evict(self, keep: Path) -> None:
        """Remove least recently used versions while the cache is over its budget."""
        if self.max_bytes <= 0:
            return
        entries: list[tuple[float, int, Path]] = []
        total = 0
        for module in os.scandir(self.versions_root):
            for version in os.scandir(module.path):
                try:
                    mtime = version.stat(follow_symlinks=False).st_mtime
                    size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(version.path))
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
                entries.append((mtime, size, Path(version.path)))
                total += size
        if total <= self.max_bytes:
            return
        now = time.time()
        for mtime, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            if path == keep or now - mtime < RECENT_S:
                continue
            remove(path)
            total -= size
            log.info("evicted %s from the download cache (%d bytes)", path, size)

    def _clean_tmp(self) -> None:
        """Remove downloads that dead processes on this host left half-done."""
        for entry in os.scandir(self.tmp_root):
            owner = scratch_owner(entry.name)
            here = owner is not None and owner[0] == self._host and owner[1] != os.getpid()
            if owner is not None and here and not alive(owner[1]):
                remove(Path(entry.path))
