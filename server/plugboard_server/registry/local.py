"""The registry on a local (or shared) directory: versioned modules, aliases, publishing, shared by replicas.

Layout under the root:
    index.sqlite               the index (WAL): one row per version, its facts, checksums, tags, aliases
    modules/<name>/<version>/  a version's files, immutable once published
    staging/<host>-<pid>-<hex>/ uploads being assembled; renamed into modules/ when published

A version exists iff its row exists. Publishing renames the staged directory to its version's place
and inserts the row in one write transaction, so a reader never sees half a version, and a process
killed at any instant leaves at most an orphan directory, which the next LocalStore removes.
Every call reads the index: what one replica publishes, the others see at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

from plugboard_server.errors import AdapterNotFound, CorruptModule
from plugboard_server.registry import _sqlite
from plugboard_server.registry._files import (
    alive,
    check_source,
    copy_file,
    digest,
    fsync_dir,
    remove,
    scratch_dir,
    scratch_name,
    scratch_owner,
    storage_errors,
)
from plugboard_server.registry.store import (
    LATEST,
    NAME_PATTERN,
    AdapterRef,
    AliasInUse,
    ModuleFacts,
    ModuleVersion,
    check_alias,
    check_name,
    check_publish,
    no_such_version,
    not_found,
    parse_ref,
)

log = logging.getLogger(__name__)

STAGING_MAX_AGE_S = 3600.0  # a staging dir this old is abandoned, whoever owns it
ORPHAN_MIN_AGE_S = 600.0  # a version dir without a row is removed only once this old


class LocalStore:
    """RegistryStore over a directory; safe across threads and across processes on one host."""

    def __init__(
        self,
        root: Path,
        *,
        staging_max_age_s: float = STAGING_MAX_AGE_S,
        orphan_min_age_s: float = ORPHAN_MIN_AGE_S,
    ) -> None:
        self.root = Path(root)
        self.modules_root = self.root / "modules"
        self.staging_root = self.root / "staging"
        self.modules_root.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname()
        self._index = _sqlite.Index(self.root / "index.sqlite")
        self._clean(staging_max_age_s, orphan_min_age_s)

    def close(self) -> None:
        self._index.close()

    # -- reading ---------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterRef:
        name, selector = parse_ref(ref)
        where, params = _sqlite.selector_where(name, selector)
        db = self._index.connection()
        row = db.execute(f"SELECT v.version, v.files FROM versions v WHERE {where}", params).fetchone()
        if row is None:
            raise self._not_found(ref, name, selector)
        files = json.loads(row[1])
        return AdapterRef(name, row[0], self._version_dir(name, row[0]), tuple(sorted(files.items())))

    def get(self, ref: str) -> ModuleVersion:
        name, selector = parse_ref(ref)
        where, params = _sqlite.selector_where(name, selector)
        db = self._index.connection()
        row = db.execute(f"SELECT {_sqlite.COLUMNS} FROM versions v WHERE {where}", params).fetchone()
        if row is None:
            raise self._not_found(ref, name, selector)
        return _sqlite.to_version(self.modules_root, row)

    def versions(self, name: str) -> list[ModuleVersion]:
        """Every version of `name`, oldest first; AdapterNotFound if it has none."""
        check_name(name)
        db = self._index.connection()
        sql = f"SELECT {_sqlite.COLUMNS} FROM versions v WHERE v.name = ? ORDER BY v.version"
        found = [_sqlite.to_version(self.modules_root, row) for row in db.execute(sql, (name,))]
        if not found:
            raise not_found(name)
        return found

    def fetch(self, ref: AdapterRef) -> Path:
        return fetch_local(ref)

    def list(self) -> list[AdapterRef]:
        db = self._index.connection()
        rows = db.execute("SELECT name, version, files FROM versions ORDER BY name, version").fetchall()
        return [
            AdapterRef(n, v, self._version_dir(n, v), tuple(sorted(json.loads(f).items())))
            for n, v, f in rows
        ]

    def list_versions(
        self,
        *,
        page_size: int = 100,
        page_token: str = "",
        kind: str = "",
        tag: str = "",
        name_prefix: str = "",
        all_versions: bool = False,
    ) -> tuple[list[ModuleVersion], str]:
        """One page ordered by (name, version). Without all_versions, each module's latest version,
        shown if it matches the filters (an older version that matches does not stand in for it)."""
        return _sqlite.list_page(
            self._index.connection(),
            self.modules_root,
            page_size=page_size,
            page_token=page_token,
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
        )

    def count(self) -> tuple[int, int]:
        db = self._index.connection()
        modules, versions = db.execute("SELECT count(DISTINCT name), count(*) FROM versions").fetchone()
        return modules, versions

    # -- writing ---------------------------------------------------------------------------------

    def staging(self) -> AbstractContextManager[Path]:
        return scratch_dir(self.staging_root, self._host, self.root)  # gone already once published

    def publish(
        self,
        name: str,
        source: Path,
        facts: ModuleFacts,
        *,
        description: str = "",
        tags: tuple[str, ...] = (),
        metadata: Mapping[str, Any] | None = None,
        alias: str | None = None,
    ) -> ModuleVersion:
        tags, metadata = check_publish(name, tags, alias, metadata)
        source = Path(source)
        check_source(source)
        # A full disk or a failed write anywhere below ends as StorageFull / StorageError, after the
        # clean-up: the staged files removed (or moved back there first), no row, no version.
        with storage_errors(self.root):
            if source.resolve().parent == self.staging_root.resolve():
                return self._publish_staged(name, source, facts, description, tags, metadata, alias)
            with self.staging() as staged:
                for entry in os.scandir(source):
                    copy_file(Path(entry.path), staged / entry.name)  # refuses a file swapped for a link
                check_source(staged)
                return self._publish_staged(name, staged, facts, description, tags, metadata, alias)

    def _publish_staged(
        self,
        name: str,
        staged: Path,
        facts: ModuleFacts,
        description: str,
        tags: tuple[str, ...],
        metadata: dict[str, Any],
        alias: str | None,
    ) -> ModuleVersion:
        files: dict[str, str] = {}
        size = 0
        for entry in sorted(os.scandir(staged), key=lambda e: e.name):
            files[entry.name], n = digest(Path(entry.path), sync=True)
            size += n
        fsync_dir(staged)
        aside: Path | None = None
        target: Path | None = None
        try:
            with self._index.write() as db:
                # Under the write lock: the version number, the rename and the row go together.
                version = _sqlite.next_version(db, name)
                target = self._version_dir(name, version)
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():  # a publisher killed between its rename and its commit
                    aside = self._set_aside(target)
                os.rename(staged, target)
                os.utime(target)  # the orphan age counts from here, not from the upload's start
                fsync_dir(target.parent)
                mv = ModuleVersion(
                    name, version, facts, size, files, time.time(), target, description, tags, metadata
                )
                _sqlite.insert_version(db, mv)
                if alias is not None:
                    _sqlite.set_alias(db, name, alias, version)
        except BaseException:
            if target is not None and not staged.exists() and not self._maybe_committed(name, version):
                try:
                    os.rename(target, staged)  # back where the staging context removes it
                except OSError:
                    log.exception("could not move %s back to staging; start-up cleanup removes it", target)
            raise
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        log.info("published %s (%d files, %d bytes)", mv.key, len(files), size)
        return dataclasses.replace(mv, aliases=(*([alias] if alias else []), LATEST))

    def set_alias(self, name: str, alias: str, version: int) -> ModuleVersion:
        check_name(name)
        check_alias(alias)
        with storage_errors(self.root), self._index.write() as db:
            if not _sqlite.exists(db, name, version):
                raise self._not_found(f"{name}@{version}", name, str(version), db)
            _sqlite.set_alias(db, name, alias, version)
        log.info("alias %s@%s -> %s@%d", name, alias, name, version)
        return self.get(f"{name}@{version}")

    def delete(self, name: str, version: int | None = None, *, force: bool = False) -> list[str]:
        check_name(name)
        with storage_errors(self.root), self._index.write() as db:
            if version is None:
                doomed = [v for (v,) in db.execute("SELECT version FROM versions WHERE name = ?", (name,))]
            else:
                doomed = [version] if _sqlite.exists(db, name, version) else []
            if not doomed:
                ref = name if version is None else f"{name}@{version}"
                raise self._not_found(ref, name, "" if version is None else str(version), db)
            marks = ",".join("?" * len(doomed))
            where = f"name = ? AND version IN ({marks})"
            aliases = db.execute(
                f"SELECT alias, version FROM aliases WHERE {where}", (name, *doomed)
            ).fetchall()
            if aliases and not force:
                held = ", ".join(f"{a} -> {name}@{v}" for a, v in sorted(aliases))
                raise AliasInUse(f"aliases point at what would be deleted ({held}); move them, or force")
            for table in ("aliases", "tags", "versions"):
                db.execute(f"DELETE FROM {table} WHERE {where}", (name, *doomed))
        # The rows are gone, so no one resolves these versions now; a reader that already has the
        # path keeps its open files (POSIX), and one that has not opened them yet gets an error.
        for v in doomed:
            shutil.rmtree(self._version_dir(name, v), ignore_errors=True)
        if version is None:
            with self._index.write() as db:  # under the lock: no publisher is about to rename into it
                if not db.execute("SELECT 1 FROM versions WHERE name = ?", (name,)).fetchone():
                    with suppress(OSError):  # not empty: an orphan or a stray file; leave it
                        (self.modules_root / name).rmdir()
        keys = [f"{name}@{v}" for v in sorted(doomed)]
        log.info(
            "deleted %s%s",
            ", ".join(keys),
            f" and aliases {sorted(a for a, _ in aliases)}" if aliases else "",
        )
        return keys

    # -- helpers ---------------------------------------------------------------------------------

    def _version_dir(self, name: str, version: int) -> Path:
        return self.modules_root / name / str(version)

    def _maybe_committed(self, name: str, version: int) -> bool:
        """After a failure: whether the row may exist (then its files must stay where they are)."""
        try:
            return _sqlite.exists(self._index.connection(), name, version)
        except sqlite3.Error:
            return True  # unsure: leave them; start-up cleanup removes them if the row is not there

    def _not_found(self, ref: str, name: str, selector: str, db: Any = None) -> AdapterNotFound:
        db = db or self._index.connection()
        (latest,) = db.execute("SELECT max(version) FROM versions WHERE name = ?", (name,)).fetchone()
        return no_such_version(ref, name, selector, latest)

    def _set_aside(self, path: Path) -> Path:
        """Move a directory into staging under this process's name, to remove it out of the write lock."""
        aside = self.staging_root / scratch_name(self._host)
        os.rename(path, aside)
        log.warning("removing %s: a version directory with no index row (an interrupted publish)", path)
        return aside

    def _clean(self, staging_max_age_s: float, orphan_min_age_s: float) -> None:
        """Remove what killed publishers left: staging dirs of dead processes, version dirs with no row."""
        now = time.time()
        for entry in os.scandir(self.staging_root):
            owner = scratch_owner(entry.name)
            here = owner is not None and owner[0] == self._host
            if owner is not None and here and owner[1] == os.getpid():
                continue  # another LocalStore in this process may be using it
            dead = owner is not None and here and not alive(owner[1])
            try:
                old = now - entry.stat(follow_symlinks=False).st_mtime > staging_max_age_s
            except FileNotFoundError:
                continue
            if dead or old:
                log.warning(
                    "removing staging dir %s (%s)", entry.path, "owner is gone" if dead else "abandoned"
                )
                remove(Path(entry.path))
        db = self._index.connection()
        known = set(db.execute("SELECT name, version FROM versions").fetchall())
        orphans: list[tuple[str, int, Path]] = []
        for module in os.scandir(self.modules_root):
            if not (module.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(module.name)):
                continue
            for v in os.scandir(module.path):
                if not (v.name.isascii() and v.name.isdigit()) or (module.name, int(v.name)) in known:
                    continue
                try:
                    if now - v.stat(follow_symlinks=False).st_mtime > orphan_min_age_s:
                        orphans.append((module.name, int(v.name), Path(v.path)))
                except FileNotFoundError:
                    continue
        if not orphans:
            return
        aside: list[Path] = []
        with self._index.write() as db:  # a publisher renames and commits under this lock: no race
            for name, version, path in orphans:
                if not _sqlite.exists(db, name, version) and path.exists():
                    aside.append(self._set_aside(path))
        for path in aside:
            remove(path)


def fetch_local(ref: AdapterRef) -> Path:
    """The version's own directory, its files checked: they are already on this filesystem."""
    if ref.sha256:
        verify_files(ref)
    return ref.path


def verify_files(ref: AdapterRef) -> None:
    """Recompute each file's sha256; CorruptModule naming the first file that is missing or differs.

    A file missing because the version was deleted after the request resolved it (its row gone from
    the index) is AdapterNotFound instead: the registry is fine, the version is just no longer there.
    """
    for filename, expected in ref.sha256:
        path = ref.path / filename
        try:
            actual, _ = digest(path)
        except FileNotFoundError:
            if deleted(ref):
                raise AdapterNotFound(f"module {ref.key} was deleted") from None
            raise CorruptModule(f"checksum mismatch: {filename} of {ref.key} is missing ({path})") from None
        if actual != expected:
            raise CorruptModule(
                f"checksum mismatch: {filename} of {ref.key} has sha256 {actual[:16]}…, "
                f"the registry recorded {expected[:16]}… ({path})"
            )


def deleted(ref: AdapterRef) -> bool:
    """Whether `ref`'s version is no longer in its registry's index (deleted since it was resolved).

    `ref.path` is <root>/modules/<name>/<version>, LocalStore's layout, so the index is found from
    it. False when that cannot be told: a path outside a registry, or an index that cannot be read.
    """
    index = ref.path.parent.parent.parent / "index.sqlite"
    if ref.path.parent.parent.name != "modules" or not index.is_file():
        return False
    try:
        # mode=rw: never create an index where there was none
        db = sqlite3.connect(f"{index.absolute().as_uri()}?mode=rw", uri=True, timeout=10.0)
        try:
            return not _sqlite.exists(db, ref.name, ref.version)
        finally:
            db.close()
    except sqlite3.Error:
        return False
