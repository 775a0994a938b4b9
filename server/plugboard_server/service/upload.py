"""Assemble a RegisterAdapter upload (file chunks at offsets, in any order) into a staging directory.

Only `adapter_config.json` and `*.safetensors` are accepted, by plain file name; sizes are bounded;
declared sizes and checksums are checked. Nothing here knows what the files mean: validation against
the base model happens after assembly. The staging directory is on the registry's disk: a write that
fails there (the disk full, say) is StorageFull / StorageError, and the caller's staging context
removes what was written.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from plugboard_server.errors import InvalidRequest
from plugboard_server.registry._files import storage_errors, write_at
from plugboard_server.registry.store import CONFIG_FILE

_SAFE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
MAX_FILES = 8
MAX_FILENAME = 128  # well inside every filesystem's 255-byte limit


def check_filename(name: str) -> str:
    if name == CONFIG_FILE:
        return name
    if not name.endswith(".safetensors"):
        raise InvalidRequest(
            f"file {name!r} refused: a module is {CONFIG_FILE} and *.safetensors files only "
            "(pickle files such as .bin are never accepted)",
            field="filename",
        )
    if not name or name.startswith(".") or not set(name) <= _SAFE_NAME_CHARS:
        raise InvalidRequest(f"file name {name!r} is not a plain file name", field="filename")
    if len(name) > MAX_FILENAME:
        raise InvalidRequest(
            f"file name {name[:32]!r}... is over {MAX_FILENAME} characters", field="filename"
        )
    return name


@dataclass
class _File:
    path: Path
    expected_size: int | None = None
    expected_sha256: str = ""
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) written so far


class UploadAssembler:
    def __init__(self, staging: Path, manifest: list[tuple[str, int, str]], max_bytes: int) -> None:
        """manifest: (file name, declared size or 0, declared sha256 or "") from the header."""
        self.staging = staging
        self.max_bytes = max_bytes
        self.total = 0
        self.files: dict[str, _File] = {}
        for name, size, sha in manifest:
            check_filename(name)
            if name in self.files:
                raise InvalidRequest(f"file {name!r} is listed twice in the header", field="files")
            if size > max_bytes:
                raise InvalidRequest(self._too_big(name, size), field="files")
            self.files[name] = _File(staging / name, size or None, sha.lower())

    def _too_big(self, name: str, size: int) -> str:
        return f"{name}: {size} bytes is over the upload limit of {self.max_bytes} bytes (--max-upload-bytes)"

    def add(self, filename: str, offset: int, data: bytes) -> None:
        check_filename(filename)
        f = self.files.get(filename)
        if f is None:
            if len(self.files) >= MAX_FILES:
                raise InvalidRequest(f"more than {MAX_FILES} files in one upload", field="filename")
            f = self.files[filename] = _File(self.staging / filename)
        end = offset + len(data)
        if end > self.max_bytes:  # before any file is touched: a huge offset would make a huge sparse file
            raise InvalidRequest(
                f"{filename}: data at offset {offset} ends past the upload limit of {self.max_bytes} bytes",
                "offset",
            )
        if f.expected_size is not None and end > f.expected_size:
            raise InvalidRequest(
                f"{filename}: data past its declared size of {f.expected_size} bytes", "offset"
            )
        if any(start < end and offset < stop for start, stop in f.ranges):
            raise InvalidRequest(
                f"{filename}: two chunks overlap at offset {offset} (a duplicate file?)", "offset"
            )
        self.total += len(data)
        if self.total > self.max_bytes:
            raise InvalidRequest(self._too_big("the upload", self.total), field="chunk")
        with storage_errors(f.path):
            fd = os.open(f.path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                write_at(fd, data, offset)
            finally:
                os.close(fd)
        f.ranges.append((offset, end))

    def finish(self) -> None:
        """Check completeness, sizes and checksums; fsync what was written."""
        if CONFIG_FILE not in self.files or not self.files[CONFIG_FILE].ranges:
            raise InvalidRequest(f"the upload has no {CONFIG_FILE}", field="files")
        if not any(n.endswith(".safetensors") and f.ranges for n, f in self.files.items()):
            raise InvalidRequest("the upload has no .safetensors weights", field="files")
        for name, f in self.files.items():
            if not f.ranges:
                raise InvalidRequest(f"{name} is declared in the header but no data arrived", field="files")
            size = f.path.stat().st_size
            covered = sum(stop - start for start, stop in f.ranges)
            if covered != size:
                raise InvalidRequest(
                    f"{name}: chunks leave gaps ({covered} of {size} bytes arrived)", "offset"
                )
            if f.expected_size is not None and size != f.expected_size:
                raise InvalidRequest(f"{name}: {size} bytes arrived, {f.expected_size} declared", "files")
            if f.expected_sha256 and _sha256(f.path) != f.expected_sha256:
                raise InvalidRequest(f"{name}: checksum mismatch (sha256 differs from the header's)", "files")
            with storage_errors(f.path), open(f.path, "rb") as fh:
                os.fsync(fh.fileno())  # where a disk that fills up late (NFS, delayed allocation) says so


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
