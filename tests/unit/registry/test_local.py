"""LocalStore in one process: versions, refs, aliases, deletes, checksums, threads."""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from plugboard_server.errors import (
    AdapterNotFound,
    CorruptModule,
    IncompatibleAdapter,
    InvalidRequest,
)
from plugboard_server.registry.local import LocalStore, deleted, verify_files
from plugboard_server.registry.store import AliasInUse, ModuleVersion
from tests.unit.registry.conftest import LORA, PREFIX, MakeModule


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_numbers_versions_and_every_field_round_trips(store: LocalStore, make_module: MakeModule):
    sources = [make_module(size=100 * (i + 1)) for i in range(3)]
    before = time.time()
    published = [
        store.publish(
            "sentiment",
            src,
            LORA if i < 2 else PREFIX,
            description=f"take {i}",
            tags=("nlp", "en") if i else (),
            metadata={"run": i, "nested": {"lr": 1e-4, "ok": True}, "list": [1, "a", None]},
        )
        for i, src in enumerate(sources)
    ]
    assert [mv.version for mv in published] == [1, 2, 3]
    for i, (mv, src) in enumerate(zip(published, sources, strict=True)):
        got = store.get(f"sentiment@{mv.version}")
        assert got.name == "sentiment" and got.version == i + 1
        assert got.facts == (LORA if i < 2 else PREFIX)
        assert got.files == {f.name: _sha(f) for f in src.iterdir()}
        assert got.size_bytes == sum(f.stat().st_size for f in src.iterdir())
        assert before <= got.created_at <= time.time()
        assert got.description == f"take {i}"
        assert got.tags == (("nlp", "en") if i else ())
        assert got.metadata == {"run": i, "nested": {"lr": 1e-4, "ok": True}, "list": [1, "a", None]}
        assert got.path == store.root / "modules" / "sentiment" / str(i + 1)
        assert {f.name: f.read_bytes() for f in got.path.iterdir()} == {
            f.name: f.read_bytes() for f in src.iterdir()
        }
        # publish's answer is what get answers, bar "latest" which moved on
        assert (mv.facts, mv.files, mv.size_bytes, mv.created_at, mv.tags, mv.metadata, mv.path) == (
            got.facts,
            got.files,
            got.size_bytes,
            got.created_at,
            got.tags,
            got.metadata,
            got.path,
        )
        assert mv.aliases == ("latest",)
        assert src.is_dir()  # a source outside staging is copied, not moved
    assert [v.version for v in store.versions("sentiment")] == [1, 2, 3]
    assert store.count() == (1, 3)
    assert [r.key for r in store.list()] == ["sentiment@1", "sentiment@2", "sentiment@3"]


def test_refs_resolve_by_name_version_latest_and_alias(store: LocalStore, make_module: MakeModule):
    for _ in range(3):
        store.publish("qa", make_module(), LORA)
    store.set_alias("qa", "stable", 2)
    cases = {"qa": 3, "qa@latest": 3, "qa@1": 1, "qa@2": 2, "qa@stable": 2}
    for ref, version in cases.items():
        resolved = store.resolve(ref)
        assert (resolved.name, resolved.version, resolved.key) == ("qa", version, f"qa@{version}")
        assert resolved.path == store.root / "modules" / "qa" / str(version)
        assert resolved.sha256 == tuple(sorted(store.get(ref).files.items()))
        assert store.get(ref).version == version
    with pytest.raises(AdapterNotFound, match="no module 'nope'"):
        store.resolve("nope")
    with pytest.raises(AdapterNotFound, match=r"no version or alias '7'.*qa@3"):
        store.resolve("qa@7")
    with pytest.raises(AdapterNotFound, match="'canary'"):
        store.get("qa@canary")
    with pytest.raises(AdapterNotFound, match="'99999999999999999999'"):
        store.resolve("qa@99999999999999999999")  # too large for SQLite: not found, not a crash
    with pytest.raises(InvalidRequest):
        store.resolve("qa@")


def test_resolve_is_cheap(store: LocalStore, make_module: MakeModule):
    store.publish("fast", make_module(), LORA)
    store.set_alias("fast", "prod", 1)
    for ref in ("fast", "fast@1", "fast@prod"):
        start = time.perf_counter()
        for _ in range(200):
            store.resolve(ref)
        per_call = (time.perf_counter() - start) / 200
        print(f"resolve({ref!r}): {per_call * 1e6:.0f} µs")
        assert per_call < 1e-3


def test_aliases_set_moved_and_listed(store: LocalStore, make_module: MakeModule):
    for _ in range(3):
        store.publish("ner", make_module(), LORA)
    assert store.set_alias("ner", "prod", 3).aliases == ("prod", "latest")
    assert store.set_alias("ner", "canary", 3).aliases == ("canary", "prod", "latest")
    moved = store.set_alias("ner", "prod", 2)  # roll back
    assert (moved.version, moved.aliases) == (2, ("prod",))
    assert store.resolve("ner@prod").version == 2
    assert store.get("ner@3").aliases == ("canary", "latest")
    assert store.get("ner@1").aliases == ()
    assert [v.aliases for v in store.versions("ner")] == [(), ("prod",), ("canary", "latest")]
    # the same alias on another module is another alias
    store.publish("pos", make_module(), LORA)
    store.set_alias("pos", "prod", 1)
    assert store.resolve("ner@prod").version == 2
    # publish can point an alias at what it publishes, in the same transaction
    mv = store.publish("ner", make_module(), LORA, alias="canary")
    assert mv.aliases == ("canary", "latest")
    assert store.get("ner@canary").version == 4
    assert store.get("ner@3").aliases == ()


def test_bad_aliases(store: LocalStore, make_module: MakeModule):
    store.publish("ner", make_module(), LORA)
    with pytest.raises(InvalidRequest, match="latest"):
        store.set_alias("ner", "latest", 1)
    for alias in ("12", "0", "", "Prod", "a/b", "..", "x" * 65):
        with pytest.raises(InvalidRequest):
            store.set_alias("ner", alias, 1)
    with pytest.raises(InvalidRequest):
        store.publish("ner", make_module(), LORA, alias="7")
    with pytest.raises(AdapterNotFound, match="'5'"):
        store.set_alias("ner", "prod", 5)
    with pytest.raises(AdapterNotFound, match="'other"):
        store.set_alias("other", "prod", 1)
    assert store.versions("ner")[0].aliases == ("latest",)
    assert store.count() == (1, 1)  # the refused publish left nothing behind


def test_delete_a_version_and_latest_falls_back(store: LocalStore, make_module: MakeModule):
    for _ in range(3):
        store.publish("ner", make_module(), LORA)
    path3 = store.get("ner@3").path
    assert store.delete("ner", 3) == ["ner@3"]
    assert not path3.exists()
    assert store.resolve("ner").version == 2
    assert store.get("ner@2").aliases == ("latest",)
    with pytest.raises(AdapterNotFound):
        store.resolve("ner@3")
    # numbers are never reused
    assert store.publish("ner", make_module(), LORA).version == 4
    assert store.delete("ner", 1) == ["ner@1"]
    assert [v.version for v in store.versions("ner")] == [2, 4]
    with pytest.raises(AdapterNotFound):
        store.delete("ner", 1)
    with pytest.raises(AdapterNotFound):
        store.delete("nope")
    assert store.count() == (1, 2)


def test_delete_all_versions_and_publish_again(store: LocalStore, make_module: MakeModule):
    for _ in range(2):
        store.publish("ner", make_module(), LORA)
    store.publish("other", make_module(), LORA)
    assert store.delete("ner") == ["ner@1", "ner@2"]
    assert not (store.root / "modules" / "ner").exists()
    with pytest.raises(AdapterNotFound, match="no module 'ner'"):
        store.resolve("ner")
    with pytest.raises(AdapterNotFound):
        store.versions("ner")
    assert store.count() == (1, 1)
    assert store.publish("ner", make_module(), LORA).version == 3


def test_delete_refuses_while_an_alias_points_at_it_unless_forced(store: LocalStore, make_module: MakeModule):
    for _ in range(3):
        store.publish("ner", make_module(), LORA)
    store.set_alias("ner", "prod", 2)
    store.set_alias("ner", "beta", 2)
    store.set_alias("ner", "canary", 3)
    with pytest.raises(AliasInUse, match=r"beta -> ner@2, prod -> ner@2"):
        store.delete("ner", 2)
    with pytest.raises(AliasInUse, match="canary"):
        store.delete("ner")
    assert store.count() == (1, 3)  # nothing was deleted
    assert store.delete("ner", 1) == ["ner@1"]  # no alias there
    assert store.delete("ner", 2, force=True) == ["ner@2"]
    with pytest.raises(AdapterNotFound):
        store.resolve("ner@prod")
    assert store.get("ner@canary").version == 3
    assert store.delete("ner", force=True) == ["ner@3"]
    # the forced delete took the aliases with it: a new version does not inherit them
    store.publish("ner", make_module(), LORA)
    with pytest.raises(AdapterNotFound):
        store.resolve("ner@canary")


def test_publish_checks_its_source_and_metadata(store: LocalStore, make_module: MakeModule, tmp_path: Path):
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidRequest, match=r"adapter_config\.json"):
        store.publish("m", no_config, LORA)
    with_subdir = make_module()
    (with_subdir / "sub").mkdir()
    with pytest.raises(InvalidRequest, match="'sub'"):
        store.publish("m", with_subdir, LORA)
    with_link = make_module()
    (with_link / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidRequest, match="'passwd'"):
        store.publish("m", with_link, LORA)
    with pytest.raises(InvalidRequest):
        store.publish("m", tmp_path / "missing", LORA)
    with pytest.raises(InvalidRequest, match="metadata"):
        store.publish("m", make_module(), LORA, metadata={"when": object()})
    with pytest.raises(InvalidRequest, match="metadata"):
        store.publish("m", make_module(), LORA, metadata={"x": float("nan")})
    with pytest.raises(InvalidRequest, match="metadata"):
        store.publish("m", make_module(), LORA, metadata={1: "int keys would come back as strings"})
    assert store.count() == (0, 0)
    assert list((store.root / "staging").iterdir()) == []
    # duplicate tags collapse, in order
    assert store.publish("m", make_module(), LORA, tags=("b", "a", "b")).tags == ("b", "a")


def test_verify_files_detects_corruption_and_missing_files(store: LocalStore, make_module: MakeModule):
    mv = store.publish("sentiment", make_module(), LORA)
    mv = store.publish("sentiment", make_module(), LORA)
    ref = store.resolve("sentiment@2")
    verify_files(ref)
    weights = ref.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[10] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(
        IncompatibleAdapter, match=r"checksum mismatch: adapter_model.safetensors of sentiment@2"
    ):
        verify_files(ref)
    (ref.path / "adapter_config.json").unlink()
    with pytest.raises(IncompatibleAdapter, match=r"adapter_config.json of sentiment@2 is missing"):
        verify_files(ref)
    verify_files(store.resolve("sentiment@1"))
    assert mv.ref == ref


def test_a_version_deleted_after_a_request_resolved_it_is_not_found_not_corrupt(
    store: LocalStore, make_module: MakeModule
):
    for _ in range(3):
        store.publish("ner", make_module(), LORA)
    store.set_alias("ner", "prod", 2)
    ref = store.resolve("ner@prod")  # a request resolves the alias...
    assert not deleted(ref)
    store.delete("ner", 2, force=True)  # ...and the version goes before its files are read
    assert not ref.path.exists() and deleted(ref)
    with pytest.raises(AdapterNotFound, match=r"module ner@2 was deleted"):
        verify_files(ref)
    # a file missing from a version still in the index is corruption, not a delete
    ref1 = store.resolve("ner@1")
    (ref1.path / "adapter_model.safetensors").unlink()
    with pytest.raises(CorruptModule, match=r"adapter_model.safetensors of ner@1 is missing"):
        verify_files(ref1)
    shutil.rmtree(ref1.path)  # its whole directory gone, its row still there: corruption too
    assert not deleted(ref1)
    with pytest.raises(CorruptModule, match=r"of ner@1 is missing"):
        verify_files(ref1)
    assert issubclass(CorruptModule, IncompatibleAdapter)  # still FAILED_PRECONDITION to a client
    # outside a registry's layout nothing can be told: a missing file is corruption
    loose = dataclasses.replace(store.resolve("ner@3"), path=make_module().parent / "gone")
    assert not deleted(loose)
    with pytest.raises(CorruptModule):
        verify_files(loose)
    verify_files(store.resolve("ner@3"))


def test_a_replica_sees_changes_at_once(tmp_path: Path, make_module: MakeModule):
    a, b = LocalStore(tmp_path / "reg"), LocalStore(tmp_path / "reg")
    a.publish("ner", make_module(), LORA)
    assert b.resolve("ner").version == 1
    b.publish("ner", make_module(), LORA)
    assert a.resolve("ner").version == 2
    a.set_alias("ner", "prod", 1)
    assert b.resolve("ner@prod").version == 1
    b.delete("ner", 2)
    assert a.get("ner").aliases == ("prod", "latest")
    assert a.count() == b.count() == (1, 1)


def test_threads_publish_concurrently(store: LocalStore, make_module: MakeModule):
    sources = [make_module() for _ in range(4)]
    results: list[ModuleVersion] = []
    errors: list[BaseException] = []

    def work(src: Path) -> None:
        try:
            for _ in range(5):
                results.append(store.publish("shared", src, LORA))
                store.resolve("shared")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(mv.version for mv in results) == list(range(1, 21))
    for mv in results:
        verify_files(store.resolve(mv.key))


def test_connections_of_finished_threads_are_closed(store: LocalStore, make_module: MakeModule):
    store.publish("ner", make_module(), LORA)

    def resolve_in_threads(n: int) -> int:
        for _ in range(n):
            t = threading.Thread(target=store.resolve, args=("ner",))
            t.start()
            t.join()
            gc.collect()  # a sqlite3.Connection is in a reference cycle with its statement cache
        return len(os.listdir("/proc/self/fd"))

    # SQLite keeps a closed connection's descriptor for reuse while others hold locks on the file,
    # so the count may rise at first; what matters is that it does not keep rising.
    first = resolve_in_threads(20)
    assert resolve_in_threads(50) - first < 3
    assert len(store._index._all) <= 2


# -- listing ---------------------------------------------------------------------------------------


def test_the_index_is_plain_sqlite(store: LocalStore, make_module: MakeModule):
    """The schema other tools may read: one row per version, files and tags as JSON."""
    import sqlite3

    store.publish("ner", make_module(), LORA, tags=("x",), metadata={"a": 1})
    db = sqlite3.connect(store.root / "index.sqlite")
    name, version, files, tags, metadata = db.execute(
        "SELECT name, version, files, tags, metadata FROM versions"
    ).fetchone()
    assert (name, version, json.loads(tags), json.loads(metadata)) == ("ner", 1, ["x"], {"a": 1})
    assert set(json.loads(files)) == {"adapter_config.json", "adapter_model.safetensors"}
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
