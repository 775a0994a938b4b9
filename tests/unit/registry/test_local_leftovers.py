"""LocalStore: what failed or killed publishers leave behind, and how it is cleaned up."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from plugboard_server.errors import (
    StorageError,
)
from plugboard_server.registry import _sqlite
from plugboard_server.registry.local import LocalStore, verify_files
from tests.unit.registry.conftest import LORA, MakeModule, write_module


def test_staging_dirs_are_removed_after_use(store: LocalStore, make_module: MakeModule):
    staging_root = store.root / "staging"
    with store.staging() as d:
        assert d.parent == staging_root and d.is_dir() and not any(d.iterdir())
        assert socket.gethostname() in d.name and str(os.getpid()) in d.name
        write_module(d)
        mv = store.publish("staged", d, LORA)
        assert not d.exists()  # moved, not copied
    assert mv.path.is_dir() and verify_files(mv.ref) is None
    with store.staging() as d:
        write_module(d)  # abandoned: never published
    with pytest.raises(RuntimeError), store.staging() as d:
        raise RuntimeError
    store.publish("copied", make_module(), LORA)
    assert list(staging_root.iterdir()) == []


def test_a_failed_publish_leaves_nothing(store: LocalStore, make_module: MakeModule, monkeypatch):
    store.publish("ner", make_module(), LORA)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(_sqlite, "insert_version", fail)
    with store.staging() as d:
        write_module(d)
        with pytest.raises(StorageError, match="disk full"):  # an OSError, reported as the registry's
            store.publish("ner", d, LORA)
        assert d.is_dir()  # moved back from modules/ner/2 into staging
    monkeypatch.undo()
    assert not (store.root / "modules" / "ner" / "2").exists()
    assert list((store.root / "staging").iterdir()) == []
    assert store.publish("ner", make_module(), LORA).version == 2


def test_a_dir_left_at_the_next_version_by_a_killed_publisher_is_replaced(
    store: LocalStore, make_module: MakeModule
):
    store.publish("ner", make_module(), LORA)
    # killed between its rename and its commit: version 2's files but no row
    orphan = write_module(store.root / "modules" / "ner" / "2")
    (orphan / "junk").write_bytes(b"junk")
    mv = store.publish("ner", make_module(), LORA)
    assert mv.version == 2
    assert sorted(p.name for p in mv.path.iterdir()) == sorted(mv.files)
    verify_files(mv.ref)
    assert list((store.root / "staging").iterdir()) == []


def test_startup_cleanup(tmp_path: Path, make_module: MakeModule):
    root = tmp_path / "registry"
    store = LocalStore(root)
    kept = store.publish("kept", make_module(), LORA)
    host, staging, modules = socket.gethostname(), root / "staging", root / "modules"
    hour_ago = time.time() - 7200

    def stage(name: str, age: float | None = None) -> Path:
        d = write_module(staging / name)
        if age is not None:
            os.utime(d, (time.time() - age, time.time() - age))
        return d

    dead_pid = _dead_pid()
    dead_here = stage(f"{host}-{dead_pid}-abc")
    alive_here = stage(f"{host}-{os.getppid()}-abc")
    own = stage(f"{host}-{os.getpid()}-abc", age=7200)  # another store in this process may use it
    young_elsewhere = stage("other-host-1-abc")
    old_elsewhere = stage("other-host-1-def", age=7200)
    old_orphan = write_module(modules / "ghost" / "1")
    os.utime(old_orphan, (hour_ago, hour_ago))
    young_orphan = write_module(modules / "kept" / "2")
    deleted_files = write_module(modules / "kept" / "5")  # a delete that did not finish removing
    os.utime(deleted_files, (hour_ago, hour_ago))
    LocalStore(root).close()
    assert not dead_here.exists() and not old_elsewhere.exists()
    assert alive_here.exists() and own.exists() and young_elsewhere.exists()
    assert not old_orphan.exists() and not deleted_files.exists() and young_orphan.exists()
    verify_files(store.resolve("kept"))
    assert store.get("kept") == kept
    # with no minimum age (a test knob; the default is 10 minutes) the young orphan goes too
    LocalStore(root, orphan_min_age_s=0, staging_max_age_s=0).close()
    assert not young_orphan.exists() and not young_elsewhere.exists() and own.exists()
    verify_files(store.resolve("kept"))


def _dead_pid() -> int:
    pid = 2**22 - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1
