"""The object-store side of S3Store: the boto3 client, and S3's errors turned into plugboard's.

Any S3-compatible store works (AWS S3, MinIO, Ceph RGW, R2, GCS's XML API) as long as it honours
conditional writes (If-Match / If-None-Match on PutObject), which S3Store uses to update a module's
index without a lock service. Credentials come from boto3's usual chain (AWS_* variables, a profile,
a pod's web identity, an instance role); the endpoint from --registry-endpoint-url or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from plugboard_server.errors import RegistryUnavailable, StorageError

log = logging.getLogger(__name__)

# Codes that say "another writer got there first": re-read and try again.
CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})
MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# Worth retrying later: the store is busy or briefly down (botocore has already retried a few times).
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "ServiceUnavailable",
        "InternalError",
        "500",
        "502",
        "503",
        "504",
    }
)


def make_client(endpoint_url: str | None = None) -> Any:
    """A thread-safe S3 client with bounded timeouts and botocore's standard retries."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # the s3 extra is missing
        raise StorageError("an s3:// registry needs boto3: pip install 'plugboard[s3]' (or boto3)") from None
    config = Config(
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=32,  # requests resolve from many worker threads at once
    )
    session = boto3.session.Session()
    region = session.region_name or "us-east-1"  # S3-compatible stores mostly ignore it; boto3 needs one
    return session.client("s3", endpoint_url=endpoint_url or None, region_name=region, config=config)


def error_code(exc: BaseException) -> str:
    """S3's error code of a ClientError ("NoSuchKey", "PreconditionFailed", ...), or ""."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def is_conflict(exc: BaseException) -> bool:
    return error_code(exc) in CONFLICT_CODES


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in MISSING_CODES


def is_not_modified(exc: BaseException) -> bool:
    return error_code(exc) in ("304", "NotModified")


@contextmanager
def s3_errors(where: str) -> Iterator[None]:
    """Turn what boto3 raises into RegistryUnavailable (retry later) or StorageError (look at it).

    Wrap whole operations, like registry._files.storage_errors, so their clean-up has run first.
    """
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

    try:
        yield
    except ClientError as e:
        code = error_code(e)
        message = e.response.get("Error", {}).get("Message", "") or str(e)
        if code in TRANSIENT_CODES:
            log.warning("the registry's object store is busy or failing (%s) at %s", code, where)
            raise RegistryUnavailable(
                f"the registry's object store answered {code} at {where}: retry shortly"
            ) from e
        log.error("the registry's object store refused a request (%s: %s) at %s", code, message, where)
        raise StorageError(
            f"the registry's object store refused a request at {where}: {code}: {message}"
        ) from e
    except (ConnectionError, HTTPClientError) as e:
        log.warning("cannot reach the registry's object store at %s: %s", where, e)
        raise RegistryUnavailable(f"cannot reach the registry's object store at {where}: {e}") from e
    except BotoCoreError as e:
        log.error("the registry's object store client failed at %s: %s", where, e)
        raise StorageError(f"the registry's object store client failed at {where}: {e}") from e


def list_objects(client: Any, bucket: str, prefix: str) -> Iterator[dict[str, Any]]:
    """Every object under `prefix` (Key, ETag, LastModified, ...), page by page."""
    with s3_errors(f"s3://{bucket}/{prefix}"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])


def delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
        batch = [{"Key": k} for k in keys[start : start + 1000]]
        with s3_errors(f"s3://{bucket}/{batch[0]['Key']}"):
            client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})


def check_conditional_writes(client: Any, bucket: str, prefix: str) -> None:
    """Refuse a store that ignores If-None-Match on PutObject: it would let two publishers take one
    version number, the second silently replacing the first's index. Three requests, at start."""
    import secrets

    from botocore.exceptions import ClientError

    key = f"{prefix}.plugboard-probe/{secrets.token_hex(8)}"
    where = f"s3://{bucket}/{key}"
    with s3_errors(where):
        client.put_object(Bucket=bucket, Key=key, Body=b"1", IfNoneMatch="*")
        try:
            client.put_object(Bucket=bucket, Key=key, Body=b"2", IfNoneMatch="*")
            honoured = False
        except ClientError as e:
            if not is_conflict(e):
                raise
            honoured = True
        finally:
            client.delete_object(Bucket=bucket, Key=key)
    if not honoured:
        raise StorageError(
            f"the object store behind s3://{bucket} ignores conditional writes (If-None-Match on "
            "PutObject), which the registry needs to publish safely from several replicas; use a store "
            "that honours them (AWS S3, MinIO since 2024, Ceph RGW, R2) or a directory registry"
        )
