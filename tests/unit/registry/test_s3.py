"""S3Store against a local S3-compatible server: versions, aliases, deletes, downloads, checksums, races."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from plugboard_server.errors import (
    AdapterNotFound,
    CorruptModule,
    InvalidRequest,
    RegistryUnavailable,
    StorageError,
)
from plugboard_server.metrics import Metrics
from plugboard_server.registry.open import open_store
from plugboard_server.registry.s3 import S3Store
from plugboard_server.registry.store import AliasInUse
from tests.support import s3
from tests.unit.registry.conftest import LORA, PREFIX, MakeModule

OpenS3 = Callable[..., S3Store]


@pytest.fixture
def open_s3(s3_endpoint: str, s3_bucket: str, tmp_path: Path) -> OpenS3:
    """Open a store on the test bucket; each call is another replica, with a download cache of its own."""
    counter = iter(range(1000))

    def make(**kwargs: Any) -> S3Store:
        kwargs.setdefault("clean_at_start", False)
        return S3Store(
            s3_bucket,
            "registry",
            client=s3.client(s3_endpoint),
            cache_dir=tmp_path / f"cache-{next(counter)}",
            **kwargs,
        )

    return make


def _objects(store: S3Store) -> list[str]:
    listed = store._s3.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}objects/")
    return sorted(o["Key"] for o in listed.get("Contents", []))


def test_publish_get_resolve_and_fetch_round_trip(open_s3: OpenS3, make_module: MakeModule):
    store = open_s3()
    src = make_module(size=1000)
    mv = store.publish(
        "sentiment", src, LORA, description="d", tags=("nlp", "nlp", "en"), metadata={"a": [1]}, alias="prod"
    )
    assert (mv.key, mv.aliases, mv.tags, mv.metadata, mv.facts) == (
        "sentiment@1",
        ("prod", "latest"),
        ("nlp", "en"),
        {"a": [1]},
        LORA,
    )
    assert mv.files == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in src.iterdir()}
    assert mv.size_bytes == sum(f.stat().st_size for f in src.iterdir())
    for ref in ("sentiment", "sentiment@1", "sentiment@prod", "sentiment@latest"):
        assert store.get(ref) == mv
        assert store.resolve(ref) == mv.ref
    path = store.fetch(mv.ref)
    assert path == mv.path
    assert {f.name: f.read_bytes() for f in path.iterdir()} == {f.name: f.read_bytes() for f in src.iterdir()}


def test_versions_are_never_reused_and_names_are_checked(open_s3: OpenS3, make_module: MakeModule):
    store = open_s3()
    for _ in range(3):
        store.publish("m", make_module(), PREFIX)
    assert store.delete("m", 3) == ["m@3"]
    assert store.publish("m", make_module(), PREFIX).version == 4
    assert store.delete("m") == ["m@1", "m@2", "m@4"]
    with pytest.raises(AdapterNotFound):
        store.get("m")
    assert store.count() == (0, 0)
    assert store.publish("m", make_module(), PREFIX).version == 5  # the numbers go on after a whole delete
    with pytest.raises(InvalidRequest):
        store.publish("Bad Name", make_module(), PREFIX)
    with pytest.raises(InvalidRequest):
        store.publish("m", make_module(), PREFIX, metadata={"x": float("nan")})


def test_aliases_guard_deletes_and_point_only_at_real_versions(open_s3: OpenS3, make_module: MakeModule):
    store = open_s3()
    store.publish("m", make_module(), LORA)
    store.publish("m", make_module(), LORA)
    assert store.set_alias("m", "prod", 1).aliases == ("prod",)
    with pytest.raises(AdapterNotFound, match="latest is m@2"):
        store.set_alias("m", "prod", 9)
    with pytest.raises(AliasInUse, match="prod -> m@1"):
        store.delete("m", 1)
    assert store.get("m@prod").version == 1
    assert store.delete("m", 1, force=True) == ["m@1"]
    with pytest.raises(AdapterNotFound, match="'prod'"):
        store.get("m@prod")
    assert [v.version for v in store.versions("m")] == [2]


def test_a_publish_on_one_replica_is_servable_on_another(open_s3: OpenS3, make_module: MakeModule):
    a, b = open_s3(refresh_s=3600.0), open_s3(refresh_s=3600.0)
    a.publish("m", make_module(), LORA)
    assert b.get("m").version == 1  # a module b never saw: looked up at once
    a.publish("m", make_module(), LORA, alias="next")
    # b's copy of the index is young, so what "latest" means there lags (by at most refresh_s) ...
    assert b.get("m").version == 1
    # ... but a version or alias it does not know yet is looked up afresh, not refused
    assert b.get("m@2").version == 2 and b.get("m@next").version == 2
    assert b.get("m").version == 2
    path = b.fetch(b.resolve("m@2"))
    assert path.is_relative_to(b._cache.root)
    c = open_s3(refresh_s=0.0)  # refresh_s=0: every lookup reads the index (a 304 when unchanged)
    a.set_alias("m", "next", 1)
    assert c.get("m@next").version == 1


def test_concurrent_publishers_on_two_replicas_take_distinct_numbers(
    open_s3: OpenS3, make_module: MakeModule
):
    replicas = [open_s3(), open_s3()]
    sources = [make_module() for _ in range(12)]
    published: list[int] = []
    lock = threading.Lock()

    def publish(i: int) -> None:
        mv = replicas[i % 2].publish("race", sources[i], LORA, tags=(f"t{i}",))
        with lock:
            published.append(mv.version)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(published) == list(range(1, 13))
    versions = replicas[0].versions("race")
    assert [v.version for v in versions] == list(range(1, 13))
    assert sorted(v.tags[0] for v in versions) == sorted(f"t{i}" for i in range(12))  # none lost


def test_fetch_downloads_once_and_refuses_what_differs_from_the_checksums(
    open_s3: OpenS3, make_module: MakeModule, monkeypatch: pytest.MonkeyPatch
):
    store = open_s3()
    mv = store.publish("m", make_module(size=4000), LORA)
    calls: list[str] = []
    real = store._s3.download_file
    monkeypatch.setattr(store._s3, "download_file", lambda *a, **k: (calls.append(a[1]), real(*a, **k))[1])
    store.fetch(mv.ref)
    store.fetch(mv.ref)
    assert len(calls) == 2  # two files, downloaded once
    # a damaged cached copy is downloaded again
    (mv.path / "adapter_model.safetensors").write_bytes(b"rot")
    store.fetch(mv.ref)
    assert len(calls) == 4
    # a changed object in the bucket is refused, and nothing of it stays in the cache
    key = store._indexes.get(mv.name).versions[1]["objects"] + "adapter_model.safetensors"
    store._s3.put_object(Bucket=store.bucket, Key=key, Body=b"tampered")
    metrics = Metrics()
    other = open_s3(metrics=metrics)
    with pytest.raises(CorruptModule, match=r"checksum mismatch: adapter_model\.safetensors of m@1"):
        other.fetch(other.resolve("m@1"))
    assert not other.get("m@1").path.exists()

    def downloads(outcome: str) -> float | None:
        return metrics.registry.get_sample_value("plugboard_registry_downloads_total", {"outcome": outcome})

    assert (downloads("corrupt"), downloads("ok")) == (1.0, None)


def test_a_version_deleted_after_it_was_resolved_is_not_found_not_corrupt(
    open_s3: OpenS3, make_module: MakeModule
):
    a, b = open_s3(), open_s3()
    ref = b.resolve(a.publish("m", make_module(), LORA).key)
    a.delete("m", 1)
    with pytest.raises(AdapterNotFound, match="was deleted"):
        b.fetch(ref)
    assert _objects(a) == []  # the deleted version's files went with it


def test_objects_missing_under_a_live_version_are_corruption(open_s3: OpenS3, make_module: MakeModule):
    store = open_s3()
    mv = store.publish("m", make_module(), LORA)
    store._s3.delete_object(Bucket=store.bucket, Key=_objects(store)[0])
    with pytest.raises(CorruptModule, match="missing from the object store"):
        open_s3().fetch(mv.ref)


def test_a_publish_cut_short_leaves_nothing_visible_and_its_objects_are_cleaned(
    open_s3: OpenS3, make_module: MakeModule, monkeypatch: pytest.MonkeyPatch
):
    store = open_s3()
    store.publish("m", make_module(), LORA)
    live = _objects(store)
    # The index write fails: the uploaded files are removed at once.
    real_put = store._s3.put_object

    def failing_put(**kwargs: Any) -> Any:
        if kwargs["Key"].endswith("/m.json"):
            raise ConnectionResetError("the connection dropped")
        return real_put(**kwargs)

    monkeypatch.setattr(store._s3, "put_object", failing_put)
    with pytest.raises(ConnectionResetError):
        store.publish("m", make_module(), LORA)
    monkeypatch.undo()
    assert _objects(store) == live and [v.version for v in store.versions("m")] == [1]
    # A publisher killed after its upload leaves objects no index names: clean_orphans removes them
    # once they are old enough, and never the live version's.
    store._s3.put_object(Bucket=store.bucket, Key="registry/objects/m/dead-1/adapter_config.json", Body=b"{}")
    assert open_s3(orphan_min_age_s=3600).clean_orphans() == 0
    assert open_s3(orphan_min_age_s=0).clean_orphans() == 1
    assert _objects(store) == live
    assert store.fetch(store.resolve("m")).is_dir()


def test_listing_and_counting_see_every_replicas_publishes(open_s3: OpenS3, make_module: MakeModule):
    a, b = open_s3(), open_s3()
    a.publish("alpha", make_module(), LORA, tags=("nlp",))
    b.list_versions()  # b now holds copies of the indexes ...
    b.publish("beta", make_module(), PREFIX)
    a.publish("alpha", make_module(), PREFIX)  # ... which a's publish makes stale: the ETag tells
    page, token = b.list_versions(all_versions=True)
    assert [v.key for v in page] == ["alpha@1", "alpha@2", "beta@1"] and token == ""
    assert [v.key for v in b.list_versions(kind="PREFIX")[0]] == ["alpha@2", "beta@1"]
    assert b.count() == (2, 3)
    a.delete("beta")
    assert b.count() == (1, 2) and [r.key for r in b.list()] == ["alpha@1", "alpha@2"]


def test_an_unreachable_store_is_unavailable_and_a_bad_location_is_refused(tmp_path: Path):
    with pytest.raises(RegistryUnavailable, match="cannot reach"):
        open_store("s3://nowhere/registry", cache_root=tmp_path, endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="s3://bucket"):
        open_store("s3:///registry", cache_root=tmp_path)
    with pytest.raises(ValueError, match="a directory or s3://"):
        open_store("gs://bucket/registry", cache_root=tmp_path)


def test_open_store_gives_each_location_its_own_cache(s3_endpoint: str, s3_bucket: str, tmp_path: Path):
    one = open_store(f"s3://{s3_bucket}/a", cache_root=tmp_path, endpoint_url=s3_endpoint)
    two = open_store(f"s3://{s3_bucket}/b", cache_root=tmp_path, endpoint_url=s3_endpoint)
    assert isinstance(one, S3Store) and one.prefix == "a/" and two.prefix == "b/"
    assert one._cache.root != two._cache.root and one._cache.root.parent == tmp_path


def test_while_the_store_is_down_what_is_here_keeps_serving(open_s3: OpenS3, make_module: MakeModule):
    store = open_s3(refresh_s=0.0)
    cached = store.publish("here", make_module(), LORA)
    store.fetch(cached.ref)
    remote_only = open_s3().publish("there", make_module(), LORA)
    store._s3 = store._indexes._s3 = s3.client("http://127.0.0.1:9")  # unreachable from now on
    assert store.get("here@1") == cached  # the copy of its index, however old
    assert store.fetch(cached.ref) == cached.path  # its files, checked, from the local cache
    with pytest.raises(RegistryUnavailable):
        store.get("there")  # never seen here: nothing to serve it from
    with pytest.raises(RegistryUnavailable):
        store.fetch(remote_only.ref)
    with pytest.raises(RegistryUnavailable):
        store.publish("here", make_module(), LORA)


def test_without_boto3_an_s3_registry_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import builtins

    real_import = builtins.__import__

    def no_boto(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in ("boto3", "botocore"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_boto)
    with pytest.raises(StorageError, match=r"pip install 'plugboard\[s3\]'"):
        open_store("s3://bucket/registry", cache_root=tmp_path)


def test_a_store_that_ignores_conditional_writes_is_refused(
    open_s3: OpenS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Without If-None-Match, two publishers could take one version number: refuse such a store."""
    client = open_s3()._s3
    real_put = client.put_object

    def put_ignoring_conditions(**kwargs: Any) -> Any:
        kwargs.pop("IfNoneMatch", None)
        kwargs.pop("IfMatch", None)
        return real_put(**kwargs)

    bucket = open_s3().bucket
    monkeypatch.setattr(client, "put_object", put_ignoring_conditions)
    with pytest.raises(StorageError, match="ignores conditional writes"):
        S3Store(bucket, "registry", client=client, cache_dir=tmp_path / "c", clean_at_start=False)
    listed = client.list_objects_v2(Bucket=bucket, Prefix="registry/.plugboard-probe/")
    assert listed.get("KeyCount", 0) == 0  # the probe cleaned up after itself
