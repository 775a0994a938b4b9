"""Open the registry a location names: a directory (LocalStore) or s3://bucket/prefix (S3Store)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from plugboard_server.metrics import Metrics
from plugboard_server.registry.s3_defaults import CACHE_BYTES, REFRESH_S
from plugboard_server.registry.store import RegistryStore


def is_object_store(location: str | Path) -> bool:
    return str(location).startswith("s3://")


def open_store(
    location: str | Path,
    *,
    cache_root: Path | None = None,
    endpoint_url: str = "",
    refresh_s: float = REFRESH_S,
    cache_bytes: int = CACHE_BYTES,
    metrics: Metrics | None = None,
) -> RegistryStore:
    """The registry at `location`; ValueError for a location that names neither kind.

    For s3://, versions are downloaded into a directory of `cache_root` of the location's own
    (the same bucket behind two endpoints is two registries), and boto3 finds the credentials;
    `metrics` counts its downloads.
    """
    text = str(location)
    if is_object_store(text):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"registry {text!r}: an object-store registry is s3://bucket[/prefix]")
        if cache_root is None:
            raise ValueError("an s3:// registry needs a local cache directory for downloaded versions")
        from plugboard_server.registry._s3client import make_client

        client = make_client(endpoint_url)  # first: without boto3, a clear error instead of an ImportError
        from plugboard_server.registry.s3 import S3Store

        tag = hashlib.sha256(f"{endpoint_url}|{text}".encode()).hexdigest()[:12]
        return S3Store(
            bucket,
            prefix,
            client=client,
            cache_dir=Path(cache_root) / f"{bucket}-{tag}",
            refresh_s=refresh_s,
            cache_bytes=cache_bytes,
            metrics=metrics,
        )
    if "://" in text:
        raise ValueError(f"registry {text!r}: give a directory or s3://bucket/prefix")
    from plugboard_server.registry.local import LocalStore

    path = Path(text)
    path.mkdir(parents=True, exist_ok=True)
    return LocalStore(path)
