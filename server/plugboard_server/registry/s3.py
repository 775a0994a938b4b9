"""The registry in an S3-compatible object store, for replicas that share no filesystem.

Layout under s3://<bucket>/<prefix>:
    index/<name>.json               the module's index: versions, facts, checksums, aliases (_s3index)
    objects/<name>/<publish-id>/<file>  a version's files, uploaded before its index entry exists

Publishing uploads the files under a fresh publish id, then adds the version to the index with a
conditional PUT (If-Match the index's ETag; If-None-Match for a new module): the index entry is the
manifest, written last, so readers never see a version whose files are not all there. A publisher
that loses the race re-reads the index and takes the next number; one killed mid-way leaves only
objects no index names, which `clean_orphans` removes once they are old.

Reads go through an in-memory copy of each index, refreshed when older than `refresh_s` (a GET with
If-None-Match: a 304 when nothing changed). A version or alias not in the copy is looked up afresh
before NOT_FOUND, so a version published on another replica is servable at once; what "latest" and
a moved alias mean can lag other replicas' publishes by up to `refresh_s`. While the store cannot
be reached, the copies keep serving what they know. `fetch` downloads a version into a local cache
(_s3cache), checking every file against the index's checksums.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from plugboard_server.errors import AdapterNotFound, CorruptModule, RegistryUnavailable, StorageError
from plugboard_server.metrics import Metrics
from plugboard_server.registry._files import check_source, digest, scratch_dir, storage_errors
from plugboard_server.registry._paging import page_in_memory
from plugboard_server.registry._s3cache import VersionCache
from plugboard_server.registry._s3client import (
    check_conditional_writes,
    delete_keys,
    is_missing,
    list_objects,
    s3_errors,
)
from plugboard_server.registry._s3index import ModuleIndex, version_record
from plugboard_server.registry._s3indexes import Indexes
from plugboard_server.registry.s3_defaults import CACHE_BYTES, ORPHAN_MIN_AGE_S, REFRESH_S
from plugboard_server.registry.store import (
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


class S3Store:
    """RegistryStore over s3://bucket/prefix; safe across threads, processes and hosts."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        client: Any,
        cache_dir: Path,
        refresh_s: float = REFRESH_S,
        cache_bytes: int = CACHE_BYTES,
        orphan_min_age_s: float = ORPHAN_MIN_AGE_S,
        clean_at_start: bool = True,
        metrics: Metrics | None = None,
    ) -> None:
        """`clean_at_start`: run clean_orphans once, on a background thread (it lists every object)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}"
        self.orphan_min_age_s = orphan_min_age_s
        self._s3 = client
        self._cache = VersionCache(Path(cache_dir), cache_bytes, metrics)
        self._staging_root = Path(cache_dir) / "staging"
        with storage_errors(self._staging_root):
            self._staging_root.mkdir(parents=True, exist_ok=True)
        self._indexes = Indexes(client, bucket, self.prefix, refresh_s, metrics)
        with s3_errors(self.location):
            self._s3.head_bucket(Bucket=bucket)  # fail at start, clearly, on a wrong bucket or credentials
        check_conditional_writes(client, bucket, self.prefix)
        if clean_at_start:
            threading.Thread(target=self._clean_quietly, name="plugboard-s3-clean", daemon=True).start()

    def close(self) -> None:
        pass  # boto3 clients need no closing; the cache stays for the next start

    # -- reading ---------------------------------------------------------------------------------

    def resolve(self, ref: str) -> AdapterRef:
        return self.get(ref).ref

    def get(self, ref: str) -> ModuleVersion:
        name, selector = parse_ref(ref)
        index = self._indexes.get(name)
        version = index.select(selector) if index else None
        if version is None:  # maybe published elsewhere since the copy was taken: look again
            index = self._indexes.get(name, fresh=True)
            version = index.select(selector) if index else None
        if index is None or version is None:
            raise self._not_found(ref, index, selector)
        return index.module_version(version, self._cache.versions_root)

    def versions(self, name: str) -> list[ModuleVersion]:
        check_name(name)
        index = self._indexes.get(name, fresh=True)
        if index is None or not index.versions:
            raise not_found(name)
        return [index.module_version(v, self._cache.versions_root) for v in sorted(index.versions)]

    def list(self) -> list[AdapterRef]:
        return [v.ref for v in self._all_versions()]

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
        return page_in_memory(
            self._all_versions(),
            page_size=page_size,
            page_token=page_token,
            kind=kind,
            tag=tag,
            name_prefix=name_prefix,
            all_versions=all_versions,
        )

    def count(self) -> tuple[int, int]:
        indexes = [i for i in self._indexes.all() if i.versions]
        return len(indexes), sum(len(i.versions) for i in indexes)

    def fetch(self, ref: AdapterRef) -> Path:
        """Download the version into the local cache once; check its files on every call."""
        index = self._indexes.get(ref.name)
        if index is None or ref.version not in index.versions:
            index = self._indexes.get(ref.name, fresh=True)
        if index is None or ref.version not in index.versions:
            self._cache.drop(ref.name, ref.version)
            raise AdapterNotFound(f"module {ref.key} was deleted")
        objects = index.versions[ref.version]["objects"]

        def download(filename: str, target: Path) -> None:
            key = objects + filename
            with s3_errors(f"{self.location}{key}"):
                try:
                    self._s3.download_file(self.bucket, key, str(target))
                except ClientError as e:
                    if not is_missing(e):
                        raise
                    if self._deleted(ref):
                        raise AdapterNotFound(f"module {ref.key} was deleted") from None
                    raise CorruptModule(
                        f"{filename} of {ref.key} is missing from the object store ({key})"
                    ) from None

        return self._cache.get(ref, download)

    # -- writing ---------------------------------------------------------------------------------

    def staging(self) -> AbstractContextManager[Path]:
        """A local directory to assemble an upload in; publish uploads it to the object store."""
        return scratch_dir(self._staging_root, socket.gethostname(), self._staging_root)

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
        files: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            files[entry.name], sizes[entry.name] = digest(Path(entry.path))
        objects = f"{self.prefix}objects/{name}/{time.time_ns():x}-{secrets.token_hex(6)}/"

        def add_version(index: ModuleIndex) -> None:
            version = index.next_version
            index.versions[version] = version_record(
                facts, files, sizes, objects, description=description, tags=tags, metadata=metadata
            )
            index.next_version = version + 1
            if alias is not None:
                index.aliases[alias] = version

        try:
            with s3_errors(f"{self.location}{objects}"):
                for filename in files:
                    self._s3.upload_file(str(source / filename), self.bucket, objects + filename)
            index = self._indexes.update(name, add_version)
        except BaseException:
            if not self._committed(name, objects):
                self._delete_objects(objects)
            raise
        version = index.latest()  # the new one: numbers only grow
        assert version is not None
        mv = index.module_version(version, self._cache.versions_root)
        log.info("published %s (%d files, %d bytes) to %s", mv.key, len(files), mv.size_bytes, self.location)
        return mv

    def set_alias(self, name: str, alias: str, version: int) -> ModuleVersion:
        check_name(name)
        check_alias(alias)

        def move(index: ModuleIndex) -> None:
            if version not in index.versions:
                raise self._not_found(f"{name}@{version}", index, str(version))
            index.aliases[alias] = version

        index = self._indexes.update(name, move)
        log.info("alias %s@%s -> %s@%d", name, alias, name, version)
        return index.module_version(version, self._cache.versions_root)

    def delete(self, name: str, version: int | None = None, *, force: bool = False) -> list[str]:
        check_name(name)
        doomed: dict[int, str] = {}  # version -> its objects' prefix
        moved: list[str] = []

        def remove(index: ModuleIndex) -> None:
            picked = [v for v in index.versions if version is None or v == version]
            if not picked:
                ref = name if version is None else f"{name}@{version}"
                raise self._not_found(ref, index, "" if version is None else str(version))
            held = sorted((a, v) for a, v in index.aliases.items() if v in picked)
            if held and not force:
                where = ", ".join(f"{a} -> {name}@{v}" for a, v in held)
                raise AliasInUse(f"aliases point at what would be deleted ({where}); move them, or force")
            doomed.clear()
            doomed.update({v: index.versions.pop(v)["objects"] for v in picked})
            moved[:] = [a for a, _ in held]
            for a in moved:
                del index.aliases[a]

        self._indexes.update(name, remove, create=False)
        # Out of the index first, so no one resolves them; then the files. A reader that resolved
        # one before and downloads now finds its objects gone: AdapterNotFound ("was deleted").
        for v, objects in doomed.items():
            self._delete_objects(objects)
            self._cache.drop(name, v)
        keys = [f"{name}@{v}" for v in sorted(doomed)]
        log.info("deleted %s%s", ", ".join(keys), f" and aliases {sorted(moved)}" if moved else "")
        return keys

    def clean_orphans(self) -> int:
        """Remove uploaded objects that no index names and that are older than orphan_min_age_s.

        They are what publishers killed between their upload and their index write left. -> how many.
        """
        now = time.time()
        stale: dict[str, list[str]] = {}  # objects prefix -> its keys
        for obj in list_objects(self._s3, self.bucket, f"{self.prefix}objects/"):
            parts = obj["Key"][len(self.prefix) :].split("/")
            if len(parts) == 4 and now - obj["LastModified"].timestamp() >= self.orphan_min_age_s:
                stale.setdefault(f"{self.prefix}objects/{parts[1]}/{parts[2]}/", []).append(obj["Key"])
        removed = 0
        for objects, keys in stale.items():
            name = objects[len(self.prefix) :].split("/")[1]
            index = self._indexes.get(name, fresh=True)
            live = {r["objects"] for r in index.versions.values()} if index else set()
            if objects not in live:
                log.warning("removing %d orphaned objects under %s (a publish cut short)", len(keys), objects)
                delete_keys(self._s3, self.bucket, keys)
                removed += len(keys)
        return removed

    def _clean_quietly(self) -> None:
        try:
            self.clean_orphans()
        except Exception:
            log.exception("cleaning orphaned objects in %s failed; the next start tries again", self.location)

    def _all_versions(self) -> list[ModuleVersion]:
        root = self._cache.versions_root
        return [i.module_version(v, root) for i in self._indexes.all() for v in sorted(i.versions)]

    # -- helpers ---------------------------------------------------------------------------------

    def _committed(self, name: str, objects: str) -> bool:
        """After a failed publish: whether its index write may have landed (then its files must stay)."""
        try:
            index = self._indexes.get(name, fresh=True)
        except (StorageError, RegistryUnavailable):
            return True  # unsure: keep them; clean_orphans removes them if no index names them
        return index is not None and any(r["objects"] == objects for r in index.versions.values())

    def _deleted(self, ref: AdapterRef) -> bool:
        try:
            index = self._indexes.get(ref.name, fresh=True)
        except (StorageError, RegistryUnavailable):
            return False
        return index is None or ref.version not in index.versions

    def _delete_objects(self, objects: str) -> None:
        try:
            keys = [o["Key"] for o in list_objects(self._s3, self.bucket, objects)]
            delete_keys(self._s3, self.bucket, keys)
        except (StorageError, RegistryUnavailable):
            log.exception("could not remove %s; clean_orphans removes it later", objects)

    def _not_found(self, ref: str, index: ModuleIndex | None, selector: str) -> AdapterNotFound:
        latest = index.latest() if index is not None else None
        return no_such_version(ref, index.name if index is not None else ref, selector, latest)
