"""The module indexes of S3Store in the bucket, with an in-memory copy of each (see registry/s3.py).

Reads use the copy while it is younger than `refresh_s`, then re-read it with If-None-Match (a 304
when nothing changed); while the store cannot be reached, the copies keep serving. Writes replace an
index with a conditional PUT and start over when another writer got there first.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from plugboard_server.errors import RegistryUnavailable, StorageError
from plugboard_server.metrics import Metrics
from plugboard_server.registry._s3client import (
    is_conflict,
    is_missing,
    is_not_modified,
    list_objects,
    s3_errors,
)
from plugboard_server.registry._s3index import ModuleIndex
from plugboard_server.registry.store import not_found

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 64  # conditional index writes lost to other writers before giving up


@dataclass
class _Cached:
    index: ModuleIndex | None  # None: the module has no index object
    etag: str
    fetched: float  # time.monotonic()


class Indexes:
    """Every module's index object under <prefix>index/, read through in-memory copies."""

    def __init__(
        self, client: Any, bucket: str, prefix: str, refresh_s: float, metrics: Metrics | None = None
    ) -> None:
        self._s3 = client
        self._metrics = metrics
        self.bucket = bucket
        self.prefix = prefix
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._copies: dict[str, _Cached] = {}

    def key(self, name: str) -> str:
        return f"{self.prefix}index/{name}.json"

    def get(self, name: str, *, fresh: bool = False) -> ModuleIndex | None:
        """The module's index: the in-memory copy while younger than refresh_s, else re-read."""
        with self._lock:
            cached = self._copies.get(name)
        if cached is not None and not fresh and time.monotonic() - cached.fetched < self.refresh_s:
            return cached.index
        try:
            return self.read(name, cached).index
        except RegistryUnavailable:
            if cached is None or fresh:
                raise
            # The store is down or throttling: keep serving what was known rather than fail every
            # request for a module that is already here (fetch finds its files in the local cache).
            log.warning(
                "serving %s from a copy of its index %.0fs old", name, time.monotonic() - cached.fetched
            )
            if self._metrics is not None:
                self._metrics.registry_stale_reads.inc()
            return cached.index

    def read(self, name: str, cached: _Cached | None) -> _Cached:
        key = self.key(name)
        now = time.monotonic()
        with s3_errors(f"s3://{self.bucket}/{key}"):
            try:
                extra = {"IfNoneMatch": cached.etag} if cached is not None and cached.etag else {}
                response = self._s3.get_object(Bucket=self.bucket, Key=key, **extra)
                entry = _Cached(ModuleIndex.from_json(response["Body"].read(), key), response["ETag"], now)
            except ClientError as e:
                if cached is not None and is_not_modified(e):
                    entry = _Cached(cached.index, cached.etag, now)
                elif is_missing(e):
                    entry = _Cached(None, "", now)
                else:
                    raise
        with self._lock:
            self._copies[name] = entry
        return entry

    def update(self, name: str, mutate: Callable[[ModuleIndex], None], *, create: bool = True) -> ModuleIndex:
        """Apply `mutate` to the module's index and write it back if no one else wrote it meanwhile."""
        key = self.key(name)
        for attempt in range(MAX_CAS_ATTEMPTS):
            current = self.read(name, None)
            if current.index is None and not create:
                raise not_found(name)
            index = current.index.copy() if current.index is not None else ModuleIndex(name)
            mutate(index)
            condition = {"IfMatch": current.etag} if current.index is not None else {"IfNoneMatch": "*"}
            with s3_errors(f"s3://{self.bucket}/{key}"):
                try:
                    response = self._s3.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=index.to_json(),
                        ContentType="application/json",
                        **condition,
                    )
                except ClientError as e:
                    if not is_conflict(e):
                        raise
                    response = None
            if response is None:  # another writer got there first: read theirs, apply ours again
                time.sleep(min(0.5, 0.005 * 2**attempt) * random.random())
                continue
            with self._lock:
                self._copies[name] = _Cached(index, response["ETag"], time.monotonic())
            return index
        raise StorageError(f"{key}: too many concurrent writers; nothing was changed, retry")

    def all(self) -> list[ModuleIndex]:
        """Every module's index, re-reading only those whose ETag changed since they were read."""
        listed: dict[str, str] = {}  # name -> the ETag of its index
        for obj in list_objects(self._s3, self.bucket, f"{self.prefix}index/"):
            file = obj["Key"][len(self.prefix) + len("index/") :]
            if file.endswith(".json") and "/" not in file:
                listed[file.removesuffix(".json")] = obj["ETag"]
        with self._lock:
            stale = [n for n, etag in listed.items() if (c := self._copies.get(n)) is None or c.etag != etag]
            for gone in set(self._copies) - set(listed):
                del self._copies[gone]
        if stale:
            with ThreadPoolExecutor(max_workers=min(16, len(stale))) as pool:
                list(pool.map(lambda n: self.read(n, None), stale))
        with self._lock:
            return [c.index for n in sorted(listed) if (c := self._copies.get(n)) and c.index]
