"""File handling for LocalStore: what a module directory may hold, writes, checksums, fsync, leftovers.

Every write of a module's bytes (an upload assembled in staging, a publish copying a directory) goes
through `write_at`, and every failed write to the registry's disk becomes a domain error in one place,
`storage_errors`: StorageFull for ENOSPC / EDQUOT (or SQLite's "database or disk is full"),
StorageError for any other.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from plugboard_server.errors import InvalidRequest, StorageError, StorageFull
from plugboard_server.registry.store import CONFIG_FILE

log = logging.getLogger(__name__)

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_COPY_BLOCK = 1 << 20


def check_source(source: Path) -> None:
    """A module directory holds adapter_config.json and other regular files: nothing that leads elsewhere."""
    if not source.is_dir():
        raise InvalidRequest(f"{source} is not a directory", "source")
    entries = list(os.scandir(source))
    for entry in entries:
        if not stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
            raise InvalidRequest(
                f"{entry.name!r}: a module holds only regular files, no directories or links"
            )
    if CONFIG_FILE not in {e.name for e in entries}:
        raise InvalidRequest(f"a module needs {CONFIG_FILE}; {source} has none")


@contextmanager
def storage_errors(where: Path) -> Iterator[None]:
    """Turn a failed write to the registry's disk into StorageFull or StorageError, naming `where`.

    Wrap whole operations (an upload's writes, a publish), so that their own clean-up (staging
    removed, a renamed version moved back) has run by the time the caller sees the error.
    """
    try:
        yield
    except OSError as e:
        full = e.errno in FULL_ERRNOS
        detail = e.strerror or str(e)
        at = Path(e.filename) if e.filename else where
        raise _storage_error(full, detail, at, where) from e
    except sqlite3.Error as e:
        code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
        if code not in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
            raise  # a busy or broken index is not a disk fault
        raise _storage_error(code == sqlite3.SQLITE_FULL, str(e), where, where) from e


def _storage_error(full: bool, detail: str, at: Path, where: Path) -> StorageError:
    if full:
        log.error("the registry's disk is full (%s) at %s", detail, at)
        return StorageFull(
            f"the registry's disk is full ({detail}) at {at}: nothing was changed; "
            f"free space on the filesystem holding {where} and retry"
        )
    log.error("a write to the registry failed (%s) at %s", detail, at)
    return StorageError(f"writing to the registry failed ({detail}) at {at}: nothing was changed")


def write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (one pwrite may write less, e.g. when the disk fills up)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        view, offset = view[written:], offset + written


def copy_file(source: Path, target: Path) -> None:
    """Copy a regular file to a new file (never through a link: a link in a module is refused)."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InvalidRequest(
                f"{source.name!r}: a module holds only regular files, no directories or links"
            ) from None
        raise
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            offset = 0
            while block := os.read(src, _COPY_BLOCK):
                write_at(dst, block, offset)
                offset += len(block)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def digest(path: Path, sync: bool = False) -> tuple[str, int]:
    """(sha256 hex, size) of a file; with sync, also flushed to disk before the version is committed."""
    with open(path, "rb") as f:
        hexdigest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
        return hexdigest, os.fstat(f.fileno()).st_size


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove(path: Path) -> None:
    """Remove a leftover directory (or a stray file or link) without following links."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def scratch_name(host: str) -> str:
    """A name for a scratch directory (staging, a download): host and pid first, so that start-up
    clean-up on this host can tell what a dead process left."""
    return f"{host}-{os.getpid()}-{secrets.token_hex(6)}"


def scratch_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a scratch_name, or None for a name of another shape."""
    host, pid_text, _ = (*name.rsplit("-", 2), "", "")[:3]
    return (host, int(pid_text)) if pid_text.isascii() and pid_text.isdigit() else None


@contextmanager
def scratch_dir(parent: Path, host: str, errors_at: Path) -> Iterator[Path]:
    """A fresh directory under `parent`, removed on exit (if still there: a publish may move it)."""
    path = parent / scratch_name(host)
    with storage_errors(errors_at):
        path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
