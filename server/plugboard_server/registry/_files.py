"""File handling for LocalStore: what a module directory may hold, checksums, fsync, leftovers."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry.store import CONFIG_FILE


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
